//! The key service's store in PostgreSQL, for several front ends at once.
//!
//! Stateless front ends (`qkdnet keyservice serve --store postgres://…` on as
//! many machines as needed) share one database. Each request is one
//! transaction on a pooled connection: the medium's row is read `FOR UPDATE`,
//! so two front ends given requests of one medium at the same moment (a replay
//! sent to both, a terminal's retry racing its original) are serialised by the
//! database: the second sees the first's new `next` and is refused as a replay.
//! So a medium key is spent once across all front ends, and a session opened
//! through one can be joined through another. The rules are the same code as
//! SQLite's ([`crate::core`]); keys are sealed the same way ([`crate::seal`]),
//! under the same master key on every front end (the store's check value
//! refuses a front end started with another).
//!
//! Session keys come from each front end's own pool (QKD keys fetched by that
//! front end, or its CSPRNG), so two front ends never hold the same one.

use std::time::Duration;

use qkdnet_kms::store::MasterKey;
use qkdnet_kms::store::postgres::{PostgresUrl, SchemaName};
use qkdnet_media::Key256;
use qkdnet_media::proto::{ChargeOffer, Identity, KeySource, RefuseReason, Request};
use std::sync::Mutex;

use tokio::sync::Semaphore;
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use crate::core::{
    AuditLine, ChargeInputs, ChargePlan, GrantInputs, GrantPlan, MediumRow, SessionRow,
    already_enrolled, decide_charge, decide_grant, fetch_plan, revocable,
};
use crate::error::{KsError, Result};
use crate::records::{AuditEntry, GrantOp, MediumInfo, Revocation, SessionKeys, SubscriberInfo};
use crate::seal::Sealer;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ks_meta (k TEXT PRIMARY KEY, v BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS ks_subscribers (
    identity TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS ks_media (
    rid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id UUID NOT NULL UNIQUE,
    identity TEXT NOT NULL REFERENCES ks_subscribers(identity),
    revoked BOOLEAN NOT NULL DEFAULT false,
    next BIGINT NOT NULL,
    charged BIGINT NOT NULL,
    bound_at BIGINT NOT NULL,
    revoked_at BIGINT,
    revoke_reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS ks_media_active ON ks_media(identity) WHERE NOT revoked;
CREATE TABLE IF NOT EXISTS ks_media_keys (
    rid BIGINT NOT NULL,
    idx BIGINT NOT NULL,
    sealed BYTEA NOT NULL,
    PRIMARY KEY (rid, idx)
);
CREATE TABLE IF NOT EXISTS ks_sessions (
    sid BYTEA PRIMARY KEY,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    source SMALLINT NOT NULL,
    sealed BYTEA NOT NULL,
    created BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ks_sessions_created ON ks_sessions(created);
CREATE TABLE IF NOT EXISTS ks_audit (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at BIGINT NOT NULL,
    event TEXT NOT NULL,
    medium UUID,
    identity TEXT,
    detail TEXT NOT NULL
);
";

const MEDIUM_COLS: &str = "rid, id, identity, revoked, next, charged";

fn pg(e: &tokio_postgres::Error) -> KsError {
    // The error text never holds a password (the URL is not repeated).
    KsError::Store(format!("PostgreSQL: {e}"))
}

fn i64_of(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| KsError::Store(format!("{what} {v} out of range")))
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn medium_row(r: &tokio_postgres::Row) -> MediumRow {
    MediumRow {
        rid: r.get(0),
        id: r.get(1),
        identity: r.get(2),
        revoked: r.get(3),
        next: u64_of(r.get(4)),
        charged: u64_of(r.get(5)),
    }
}

fn source_code(s: KeySource) -> i16 {
    match s {
        KeySource::Qkd => 1,
        _ => 2,
    }
}

/// The PostgreSQL store: a small pool of connections.
pub struct PgStore {
    conns: Mutex<Vec<PgConn>>,
    slots: Semaphore,
    config: tokio_postgres::Config,
    schema: SchemaName,
    sealer: Sealer,
}

impl core::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

async fn connect(config: &tokio_postgres::Config, schema: &SchemaName) -> Result<Client> {
    let (client, conn) = config.connect(NoTls).await.map_err(|e| pg(&e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("PostgreSQL connection ended: {e}");
        }
    });
    // SchemaName allows no double quote, so quoting it is enough.
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{0}\"; SET search_path TO \"{0}\"",
            schema.as_str()
        ))
        .await
        .map_err(|e| pg(&e))?;
    Ok(client)
}

/// A pooled connection and the statements it has prepared.
struct PgConn {
    client: Client,
    grant: Option<GrantStmts>,
}

/// The statements of a terminal request, prepared once per connection: parsing
/// and planning each statement anew was most of PostgreSQL's work per request.
#[derive(Clone)]
struct GrantStmts {
    medium: Statement,
    keys: Statement,
    session: Statement,
    peer_active: Statement,
    consume: Statement,
    advance: Statement,
    drop_expired: Statement,
    insert_session: Statement,
    audit: Statement,
}

const SQL_MEDIUM_FOR_UPDATE: &str =
    "SELECT rid, id, identity, revoked, next, charged FROM ks_media WHERE id = $1 FOR UPDATE";
const SQL_KEYS: &str = "SELECT idx, sealed FROM ks_media_keys WHERE rid = $1 AND idx = ANY($2)";
const SQL_SESSION: &str =
    "SELECT a, b, source, sealed, created FROM ks_sessions WHERE sid = $1 AND created >= $2";
const SQL_PEER_ACTIVE: &str = "SELECT 1 FROM ks_media WHERE identity = $1 AND NOT revoked";
const SQL_CONSUME: &str = "DELETE FROM ks_media_keys WHERE rid = $1 AND idx BETWEEN $2 AND $3";
const SQL_ADVANCE: &str = "UPDATE ks_media SET next = $2 WHERE rid = $1";
const SQL_DROP_EXPIRED: &str = "DELETE FROM ks_sessions WHERE sid = $1 AND created < $2";
const SQL_INSERT_SESSION: &str =
    "INSERT INTO ks_sessions (sid, a, b, source, sealed, created) VALUES ($1, $2, $3, $4, $5, $6)";
const SQL_AUDIT: &str =
    "INSERT INTO ks_audit (at, event, medium, identity, detail) VALUES ($1, $2, $3, $4, $5)";

impl PgConn {
    async fn grant_stmts(&mut self) -> Result<GrantStmts> {
        if let Some(g) = &self.grant {
            return Ok(g.clone());
        }
        let c = &self.client;
        let p = |sql: &'static str| async move { c.prepare(sql).await.map_err(|e| pg(&e)) };
        let g = GrantStmts {
            medium: p(SQL_MEDIUM_FOR_UPDATE).await?,
            keys: p(SQL_KEYS).await?,
            session: p(SQL_SESSION).await?,
            peer_active: p(SQL_PEER_ACTIVE).await?,
            consume: p(SQL_CONSUME).await?,
            advance: p(SQL_ADVANCE).await?,
            drop_expired: p(SQL_DROP_EXPIRED).await?,
            insert_session: p(SQL_INSERT_SESSION).await?,
            audit: p(SQL_AUDIT).await?,
        };
        self.grant = Some(g.clone());
        Ok(g)
    }
}

/// A connection leased from the pool; back on drop (a broken one is dropped).
struct Lease<'a> {
    store: &'a PgStore,
    client: Option<PgConn>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take().filter(|c| !c.client.is_closed()) {
            if let Ok(mut v) = self.store.conns.lock() {
                v.push(c);
            }
        }
    }
}

impl PgStore {
    /// Connects, creates the schema and tables if missing and checks the
    /// master key. Front ends that share a store use the same schema.
    pub async fn open(
        url: &PostgresUrl,
        schema: &SchemaName,
        master: &MasterKey,
        pool_size: usize,
    ) -> Result<Self> {
        let mut config = url.config().clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("qkdnet-keyservice");
        let client = connect(&config, schema).await?;
        client.batch_execute(SCHEMA).await.map_err(|e| pg(&e))?;
        let mut salt = [0u8; 32];
        getrandom::fill(&mut salt).expect("invariant: the OS CSPRNG works");
        let fresh = Sealer::new(master, &salt);
        // The first front end to get here writes the salt; the others read it.
        client
            .execute(
                "INSERT INTO ks_meta (k, v) VALUES ('salt', $1), ('check', $2) ON CONFLICT DO NOTHING",
                &[&&salt[..], &&fresh.check_value()[..]],
            )
            .await
            .map_err(|e| pg(&e))?;
        let get = |k: &'static str| {
            let client = &client;
            async move {
                client
                    .query_one("SELECT v FROM ks_meta WHERE k = $1", &[&k])
                    .await
                    .map(|r| r.get::<_, Vec<u8>>(0))
                    .map_err(|e| pg(&e))
            }
        };
        let (salt, check) = (get("salt").await?, get("check").await?);
        let sealer = Sealer::new(master, &salt);
        sealer.verify_check(&check)?;
        let size = pool_size.max(1);
        Ok(Self {
            conns: Mutex::new(vec![PgConn {
                client,
                grant: None,
            }]),
            slots: Semaphore::new(size),
            config,
            schema: schema.clone(),
            sealer,
        })
    }

    async fn lease(&self) -> Result<Lease<'_>> {
        let permit = self
            .slots
            .acquire()
            .await
            .map_err(|_| KsError::Store("store closed".into()))?;
        let pooled = self.conns.lock().ok().and_then(|mut v| v.pop());
        let client = match pooled {
            Some(c) => c,
            None => PgConn {
                client: connect(&self.config, &self.schema).await?,
                grant: None,
            },
        };
        Ok(Lease {
            store: self,
            client: Some(client),
            _permit: permit,
        })
    }

    async fn audit(tx: &tokio_postgres::Transaction<'_>, now: u64, line: &AuditLine) -> Result<()> {
        Self::audit_with(tx, SQL_AUDIT, now, line).await
    }

    async fn audit_with<T: tokio_postgres::ToStatement + ?Sized>(
        tx: &tokio_postgres::Transaction<'_>,
        stmt: &T,
        now: u64,
        line: &AuditLine,
    ) -> Result<()> {
        tx.execute(
            stmt,
            &[
                &i64_of(now, "time")?,
                &line.event,
                &line.medium,
                &line.identity,
                &line.detail,
            ],
        )
        .await
        .map_err(|e| pg(&e))?;
        Ok(())
    }

    /// Decides and commits one terminal request. Retries once when two
    /// front ends open the same new session at the same moment.
    pub async fn grant(
        &self,
        op: &GrantOp,
        keys: &std::sync::Mutex<Box<dyn SessionKeys>>,
        now: u64,
    ) -> Result<GrantPlan> {
        let mut lease = self.lease().await?;
        let conn = lease.client.as_mut().expect("invariant: leased");
        let st = conn.grant_stmts().await?;
        for attempt in 0..3 {
            match self.grant_once(&mut conn.client, &st, op, keys, now).await {
                Err(KsError::Store(e)) if attempt < 2 && e.contains("duplicate key") => continue,
                r => return r,
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    async fn grant_once(
        &self,
        client: &mut Client,
        st: &GrantStmts,
        op: &GrantOp,
        keys: &std::sync::Mutex<Box<dyn SessionKeys>>,
        now: u64,
    ) -> Result<GrantPlan> {
        let tx = client.transaction().await.map_err(|e| pg(&e))?;
        let medium = tx
            .query_opt(&st.medium, &[&op.req.medium_id])
            .await
            .map_err(|e| pg(&e))?
            .map(|r| medium_row(&r));
        let fetch = fetch_plan(medium.as_ref(), &op.req, op.max_skip);
        let mut got: [Option<Key256>; 2] = [None, None];
        if let (Some(idx), Some(m)) = (fetch.keys, &medium) {
            let rows = tx
                .query(
                    &st.keys,
                    &[
                        &m.rid,
                        &vec![i64_of(idx[0], "index")?, i64_of(idx[1], "index")?],
                    ],
                )
                .await
                .map_err(|e| pg(&e))?;
            for r in rows {
                let i = u64_of(r.get(0));
                let k = self.sealer.open_medium_key(&m.id, i, r.get(1))?;
                if let Some(p) = idx.iter().position(|x| *x == i) {
                    got[p] = Some(k);
                }
            }
        }
        let sid = op.req.request.session_id();
        let session = tx
            .query_opt(
                &st.session,
                &[
                    &&sid[..],
                    &i64_of(now.saturating_sub(op.session_ttl), "time")?,
                ],
            )
            .await
            .map_err(|e| pg(&e))?
            .map(|r| -> Result<SessionRow> {
                let bad = |_| KsError::Store("a stored session has an invalid identity".into());
                Ok(SessionRow {
                    session_id: sid,
                    a: Identity::new(r.get::<_, String>(0)).map_err(bad)?,
                    b: Identity::new(r.get::<_, String>(1)).map_err(bad)?,
                    source: if r.get::<_, i16>(2) == 1 {
                        KeySource::Qkd
                    } else {
                        KeySource::Csprng
                    },
                    key: self.sealer.open_session_key(&sid, r.get(3))?,
                    created: u64_of(r.get(4)),
                })
            })
            .transpose()?;
        let peer_active = match &op.req.request {
            Request::SessionKey { peer, .. } if session.is_none() => tx
                .query_opt(&st.peer_active, &[&peer.as_str()])
                .await
                .map_err(|e| pg(&e))?
                .is_some(),
            _ => false,
        };
        let plan = decide_grant(
            GrantInputs {
                challenge: &op.challenge,
                req: &op.req,
                medium: medium.as_ref(),
                keys: got,
                session,
                peer_active,
                max_skip: op.max_skip,
                now,
                nonce: op.nonce,
            },
            || match keys.lock() {
                Ok(mut k) => k.draw(),
                Err(p) => p.into_inner().draw(),
            },
        );
        if let Some(c) = plan.consume {
            tx.execute(
                &st.consume,
                &[
                    &c.rid,
                    &i64_of(c.first, "index")?,
                    &i64_of(c.last, "index")?,
                ],
            )
            .await
            .map_err(|e| pg(&e))?;
            tx.execute(&st.advance, &[&c.rid, &i64_of(c.next, "index")?])
                .await
                .map_err(|e| pg(&e))?;
        }
        if let Some(s) = &plan.new_session {
            // A plain insert: a concurrent opener of the same ID makes this
            // fail with a duplicate key, and the retry sees its session.
            tx.execute(
                &st.drop_expired,
                &[
                    &&s.session_id[..],
                    &i64_of(now.saturating_sub(op.session_ttl), "time")?,
                ],
            )
            .await
            .map_err(|e| pg(&e))?;
            tx.execute(
                &st.insert_session,
                &[
                    &&s.session_id[..],
                    &s.a.as_str(),
                    &s.b.as_str(),
                    &source_code(s.source),
                    &self.sealer.seal_session_key(&s.session_id, &s.key),
                    &i64_of(s.created, "time")?,
                ],
            )
            .await
            .map_err(|e| pg(&e))?;
        }
        if let Some(line) = &plan.audit {
            Self::audit_with(&tx, &st.audit, now, line).await?;
        }
        tx.commit().await.map_err(|e| pg(&e))?;
        Ok(plan)
    }

    /// Stores the keys of a verified charge offer, all or nothing.
    pub async fn charge(
        &self,
        offer: &ChargeOffer,
        keys: &[Key256],
        now: u64,
    ) -> Result<Result<(), RefuseReason>> {
        let mut lease = self.lease().await?;
        let client = &mut lease.client.as_mut().expect("invariant: leased").client;
        let tx = client.transaction().await.map_err(|e| pg(&e))?;
        let owner = offer.terms.owner.as_str();
        let enrolled = tx
            .query_opt(
                "SELECT 1 FROM ks_subscribers WHERE identity = $1",
                &[&owner],
            )
            .await
            .map_err(|e| pg(&e))?
            .is_some();
        let medium = tx
            .query_opt(
                &format!("SELECT {MEDIUM_COLS} FROM ks_media WHERE id = $1 FOR UPDATE"),
                &[&offer.terms.medium_id],
            )
            .await
            .map_err(|e| pg(&e))?
            .map(|r| medium_row(&r));
        let owner_active: Option<Uuid> = tx
            .query_opt(
                "SELECT id FROM ks_media WHERE identity = $1 AND NOT revoked",
                &[&owner],
            )
            .await
            .map_err(|e| pg(&e))?
            .map(|r| r.get(0));
        let plan = decide_charge(&ChargeInputs {
            offer,
            enrolled,
            medium: medium.as_ref(),
            owner_active,
        });
        let (bind, first, charged, audit) = match plan {
            ChargePlan::Refuse(r) => return Ok(Err(r)),
            ChargePlan::Apply {
                bind,
                first,
                charged,
                audit,
            } => (bind, first, charged, audit),
        };
        let rid: i64 = if bind {
            let rid = tx
                .query_one(
                    "INSERT INTO ks_media (id, identity, next, charged, bound_at) VALUES ($1, $2, 0, 0, $3) RETURNING rid",
                    &[&offer.terms.medium_id, &owner, &i64_of(now, "time")?],
                )
                .await
                .map_err(|e| pg(&e))?
                .get(0);
            Self::audit(&tx, now, &AuditLine::bind(offer)).await?;
            rid
        } else {
            medium
                .as_ref()
                .map(|m| m.rid)
                .expect("invariant: not bind ⇒ known")
        };
        tx.execute(
            "DELETE FROM ks_media_keys WHERE rid = $1 AND idx >= $2",
            &[&rid, &i64_of(first, "index")?],
        )
        .await
        .map_err(|e| pg(&e))?;
        let idx: Vec<i64> = (0..keys.len() as u64)
            .map(|i| i64_of(first + i, "index"))
            .collect::<Result<_>>()?;
        let sealed: Vec<Vec<u8>> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                self.sealer
                    .seal_medium_key(&offer.terms.medium_id, first + i as u64, k)
            })
            .collect();
        tx.execute(
            "INSERT INTO ks_media_keys (rid, idx, sealed) SELECT $1, * FROM unnest($2::bigint[], $3::bytea[])",
            &[&rid, &idx, &sealed],
        )
        .await
        .map_err(|e| pg(&e))?;
        tx.execute(
            "UPDATE ks_media SET charged = $2 WHERE rid = $1",
            &[&rid, &i64_of(charged, "index")?],
        )
        .await
        .map_err(|e| pg(&e))?;
        Self::audit(&tx, now, &audit).await?;
        tx.commit().await.map_err(|e| pg(&e))?;
        Ok(Ok(()))
    }

    /// Enrols a subscriber.
    pub async fn enrol(&self, identity: &Identity, name: &str, now: u64) -> Result<()> {
        let mut lease = self.lease().await?;
        let client = &mut lease.client.as_mut().expect("invariant: leased").client;
        let tx = client.transaction().await.map_err(|e| pg(&e))?;
        let n = tx
            .execute(
                "INSERT INTO ks_subscribers (identity, name, enrolled_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&identity.as_str(), &name, &i64_of(now, "time")?],
            )
            .await
            .map_err(|e| pg(&e))?;
        if n == 0 {
            return Err(already_enrolled(identity));
        }
        Self::audit(&tx, now, &AuditLine::enrol(identity, name)).await?;
        tx.commit().await.map_err(|e| pg(&e))
    }

    /// Revokes a medium; its keys are destroyed at once.
    pub async fn revoke(&self, medium: &Uuid, reason: &str, now: u64) -> Result<Revocation> {
        let mut lease = self.lease().await?;
        let client = &mut lease.client.as_mut().expect("invariant: leased").client;
        let tx = client.transaction().await.map_err(|e| pg(&e))?;
        let row = tx
            .query_opt(
                &format!("SELECT {MEDIUM_COLS} FROM ks_media WHERE id = $1 FOR UPDATE"),
                &[medium],
            )
            .await
            .map_err(|e| pg(&e))?
            .map(|r| medium_row(&r));
        let row = revocable(row, medium)?;
        tx.execute(
            "UPDATE ks_media SET revoked = true, revoked_at = $2, revoke_reason = $3 WHERE rid = $1",
            &[&row.rid, &i64_of(now, "time")?, &reason],
        )
        .await
        .map_err(|e| pg(&e))?;
        let destroyed = tx
            .execute("DELETE FROM ks_media_keys WHERE rid = $1", &[&row.rid])
            .await
            .map_err(|e| pg(&e))?;
        Self::audit(&tx, now, &AuditLine::revoke(&row, reason, destroyed as u64)).await?;
        tx.commit().await.map_err(|e| pg(&e))?;
        Ok(Revocation {
            identity: row.identity,
            destroyed,
        })
    }

    /// Every subscriber with its active medium.
    pub async fn subscribers(&self) -> Result<Vec<SubscriberInfo>> {
        let lease = self.lease().await?;
        let client = &lease.client.as_ref().expect("invariant: leased").client;
        let rows = client
            .query(
                "SELECT s.identity, s.name, s.enrolled_at, m.id FROM ks_subscribers s
                 LEFT JOIN ks_media m ON m.identity = s.identity AND NOT m.revoked ORDER BY s.identity",
                &[],
            )
            .await
            .map_err(|e| pg(&e))?;
        Ok(rows
            .iter()
            .map(|r| SubscriberInfo {
                identity: r.get(0),
                name: r.get(1),
                enrolled_at: u64_of(r.get(2)),
                medium: r.get(3),
            })
            .collect())
    }

    /// Every medium the service knows.
    pub async fn media(&self) -> Result<Vec<MediumInfo>> {
        let lease = self.lease().await?;
        let client = &lease.client.as_ref().expect("invariant: leased").client;
        let rows = client
            .query(
                &format!(
                    "SELECT {MEDIUM_COLS}, bound_at, revoked_at, revoke_reason FROM ks_media ORDER BY rid"
                ),
                &[],
            )
            .await
            .map_err(|e| pg(&e))?;
        Ok(rows
            .iter()
            .map(|r| MediumInfo {
                row: medium_row(r),
                bound_at: u64_of(r.get(6)),
                revoked_at: r.get::<_, Option<i64>>(7).map(u64_of),
                revoke_reason: r.get(8),
            })
            .collect())
    }

    /// The last `limit` audit lines, oldest first.
    pub async fn audit_tail(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        let lease = self.lease().await?;
        let client = &lease.client.as_ref().expect("invariant: leased").client;
        let rows = client
            .query(
                "SELECT seq, at, event, medium, identity, detail FROM
                 (SELECT * FROM ks_audit ORDER BY seq DESC LIMIT $1) t ORDER BY seq",
                &[&i64::from(limit)],
            )
            .await
            .map_err(|e| pg(&e))?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                seq: u64_of(r.get(0)),
                at: u64_of(r.get(1)),
                event: r.get(2),
                medium: r.get(3),
                identity: r.get(4),
                detail: r.get(5),
            })
            .collect())
    }

    /// Refreshes the planner's statistics (`ANALYZE`), as autovacuum would in
    /// service; a benchmark runs it after loading media in bulk.
    pub async fn analyze(&self) -> Result<()> {
        let lease = self.lease().await?;
        let client = &lease.client.as_ref().expect("invariant: leased").client;
        client
            .batch_execute("ANALYZE ks_media; ANALYZE ks_media_keys; ANALYZE ks_sessions")
            .await
            .map_err(|e| pg(&e))
    }

    /// Deletes sessions opened before `before`.
    pub async fn purge_sessions(&self, before: u64) -> Result<u64> {
        let lease = self.lease().await?;
        let client = &lease.client.as_ref().expect("invariant: leased").client;
        client
            .execute(
                "DELETE FROM ks_sessions WHERE created < $1",
                &[&i64_of(before, "time")?],
            )
            .await
            .map_err(|e| pg(&e))
    }
}
