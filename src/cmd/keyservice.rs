//! `qkdnet keyservice init | serve | enrol | subscribers | media | audit`: the
//! operator's key service for quantum security media (issue #20). Terminals
//! reach it over the ordinary network with their charged media; charging points
//! (SAEs of the QKD network) charge media through it. See the
//! `qkdnet-keyservice` crate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use qkdnet_keyservice::postgres::PgStore;
use qkdnet_keyservice::qkd::KeyPool;
use qkdnet_keyservice::server::{Metrics, ServerConfig, Service, serve};
use qkdnet_keyservice::sqlite::SqliteStore;
use qkdnet_keyservice::store::{
    AuditEntry, Durability, MediumInfo, Revocation, Store, SubscriberInfo, unix_now,
};
use qkdnet_kms::connect::ConnectFile;
use qkdnet_kms::store::MasterKey;
use qkdnet_kms::store::postgres::{PostgresUrl, SchemaName};
use qkdnet_media::proto::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the service's store is.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// The service's store: a SQLite file, or a PostgreSQL URL
    /// (`postgres://user:password@host/db`) that several front ends share.
    #[arg(long, value_name = "FILE|URL")]
    pub store: String,
    /// The master key file its keys are sealed under (32 bytes, mode 0600;
    /// made by `qkdnet keyservice init`; the same file on every front end).
    #[arg(long, value_name = "FILE")]
    pub master_key: PathBuf,
    /// PostgreSQL schema of the service's tables.
    #[arg(long, value_name = "NAME", default_value = "qkdnet_keyservice")]
    pub pg_schema: String,
}

/// The store as the admin commands use it.
pub enum AdminStore {
    /// SQLite.
    Sqlite(Box<SqliteStore>),
    /// PostgreSQL (with a runtime to drive it).
    Postgres(Box<PgStore>, tokio::runtime::Runtime),
}

impl StoreArgs {
    fn schema(&self) -> anyhow::Result<SchemaName> {
        SchemaName::new(&self.pg_schema).map_err(|e| anyhow::anyhow!("--pg-schema: {e}"))
    }

    fn url(&self) -> Option<anyhow::Result<PostgresUrl>> {
        (self.store.starts_with("postgres://") || self.store.starts_with("postgresql://")).then(
            || {
                self.store
                    .parse::<PostgresUrl>()
                    .map_err(|e| anyhow::anyhow!(e))
            },
        )
    }

    /// Opens the store (it must have been made by `init`).
    pub fn open(&self) -> anyhow::Result<AdminStore> {
        let master = MasterKey::read_file(&self.master_key)?;
        if let Some(url) = self.url() {
            let url = url?;
            let rt = crate::cmd::msg::runtime()?;
            let db = rt.block_on(PgStore::open(&url, &self.schema()?, &master, 1))?;
            return Ok(AdminStore::Postgres(Box::new(db), rt));
        }
        let path = Path::new(&self.store);
        if !path.exists() {
            anyhow::bail!(
                "{} does not exist: make it with `qkdnet keyservice init --store {} --master-key {}`",
                self.store,
                self.store,
                self.master_key.display()
            );
        }
        Ok(AdminStore::Sqlite(Box::new(SqliteStore::open(
            path, &master,
        )?)))
    }
}

impl StoreArgs {
    /// Opens the store, creating a SQLite file if missing (for `init`).
    fn open_or_create(&self) -> anyhow::Result<AdminStore> {
        if self.url().is_none() && !Path::new(&self.store).exists() {
            let master = MasterKey::read_file(&self.master_key)?;
            SqliteStore::open(Path::new(&self.store), &master)?;
        }
        self.open()
    }
}

impl AdminStore {
    /// Enrols a subscriber.
    pub fn enrol(&mut self, id: &Identity, name: &str) -> anyhow::Result<()> {
        match self {
            Self::Sqlite(s) => s.enrol(id, name, unix_now())?,
            Self::Postgres(s, rt) => rt.block_on(s.enrol(id, name, unix_now()))?,
        }
        Ok(())
    }

    /// Revokes a medium.
    pub fn revoke(&mut self, medium: &uuid::Uuid, reason: &str) -> anyhow::Result<Revocation> {
        Ok(match self {
            Self::Sqlite(s) => s.revoke(medium, reason, unix_now())?,
            Self::Postgres(s, rt) => rt.block_on(s.revoke(medium, reason, unix_now()))?,
        })
    }

    fn subscribers(&self) -> anyhow::Result<Vec<SubscriberInfo>> {
        Ok(match self {
            Self::Sqlite(s) => s.subscribers()?,
            Self::Postgres(s, rt) => rt.block_on(s.subscribers())?,
        })
    }

    fn media(&self) -> anyhow::Result<Vec<MediumInfo>> {
        Ok(match self {
            Self::Sqlite(s) => s.media()?,
            Self::Postgres(s, rt) => rt.block_on(s.media())?,
        })
    }

    fn audit_tail(&self, limit: u32) -> anyhow::Result<Vec<AuditEntry>> {
        Ok(match self {
            Self::Sqlite(s) => s.audit_tail(limit)?,
            Self::Postgres(s, rt) => rt.block_on(s.audit_tail(limit))?,
        })
    }
}

/// Key service subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyserviceCommand {
    /// Create the service's store and master key.
    ///
    /// Example: qkdnet keyservice init --store ks.db --master-key ks.key
    Init {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Serve terminals and charging points.
    ///
    /// Example: qkdnet keyservice serve --store ks.db --master-key ks.key --listen 127.0.0.1:7700 --connect STATE/connect.json --as sae-core --qkd-peer sae-north
    Serve {
        #[command(flatten)]
        store: StoreArgs,
        /// Address for terminals and charging points (plain TCP: the protocol
        /// authenticates every request).
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: String,
        /// The network's connect file (for the service's own SAE).
        #[arg(long, value_name = "FILE", requires = "as_sae")]
        connect: Option<PathBuf>,
        /// The service's SAE ID (the slave of the charging points' enc_keys).
        #[arg(long = "as", value_name = "SAE", requires = "connect")]
        as_sae: Option<String>,
        /// A remote SAE to draw session keys from the QKD network with
        /// (enc_keys toward it); without it, session keys come from the CSPRNG.
        #[arg(long, value_name = "SAE", requires = "connect")]
        qkd_peer: Option<String>,
        /// QKD keys kept ready for sessions.
        #[arg(long, default_value_t = 512)]
        qkd_pool: usize,
        /// Allowed charging point (SAE ID); repeat. Default: any SAE whose keys
        /// the service's KME hands over.
        #[arg(long = "charger", value_name = "SAE")]
        chargers: Vec<String>,
        /// Keys a terminal may be ahead of the service (lost answers, a terminal
        /// killed mid-request); 0 is strict.
        #[arg(long, default_value_t = 64)]
        max_skip: u64,
        /// Seconds a session can be joined after it is opened.
        #[arg(long, default_value_t = 300)]
        session_ttl: u64,
        /// Serve Prometheus metrics over HTTP here (`/metrics`).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// SQLite store: `full` answers a terminal once its request is on disk
        /// (survives power loss); `normal` once committed (survives a crash of
        /// the service, not of the machine's power; a lost commit would make
        /// keys the terminals destroyed usable again here). Only to compare.
        #[arg(long, value_enum, default_value = "full")]
        synchronous: Synchronous,
    },
    /// Enrol a subscriber (a SIP URI, a device ID). Its medium is bound at its
    /// first charge.
    Enrol {
        #[command(flatten)]
        store: StoreArgs,
        /// The subscriber's identity (as the owner written in its medium).
        identity: String,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Subscribers and their active media.
    Subscribers {
        #[command(flatten)]
        store: StoreArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Media the service knows: keys remaining, revoked or not (never a key).
    Media {
        #[command(flatten)]
        store: StoreArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The audit trail: enrolment, binding, charging, authentication, revocation.
    Audit {
        #[command(flatten)]
        store: StoreArgs,
        /// Lines to show (the newest).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// `keyservice serve --synchronous`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Synchronous {
    /// Answer once the request is on disk.
    Full,
    /// Answer once committed (not synced).
    Normal,
}

/// Runs a key service subcommand.
pub fn run(c: KeyserviceCommand) -> anyhow::Result<()> {
    match c {
        KeyserviceCommand::Init { store } => {
            if store.url().is_none() && Path::new(&store.store).exists() {
                anyhow::bail!("{} exists already", store.store);
            }
            if !store.master_key.exists() {
                MasterKey::create_file(&store.master_key)?;
            }
            drop(store.open_or_create()?);
            println!(
                "key service store {} ready; its keys are sealed under {} (keep it apart from backups of the store)",
                if store.url().is_some() {
                    "(PostgreSQL)"
                } else {
                    &store.store
                },
                store.master_key.display()
            );
            Ok(())
        }
        KeyserviceCommand::Serve {
            store,
            listen,
            connect,
            as_sae,
            qkd_peer,
            qkd_pool,
            chargers,
            max_skip,
            session_ttl,
            metrics,
            synchronous,
        } => {
            let master = MasterKey::read_file(&store.master_key)?;
            let url = store.url().transpose()?;
            if url.is_none() {
                drop(store.open()?);
            }
            let rt = crate::cmd::msg::runtime()?;
            rt.block_on(async move {
                let kme = match (&connect, &as_sae) {
                    (Some(c), Some(sae)) => Some(
                        ConnectFile::load(c)?
                            .client(sae, Duration::from_secs(10))
                            .with_context(|| format!("the service's SAE {sae}"))?,
                    ),
                    _ => None,
                };
                let pool = KeyPool::new();
                if let (Some(client), Some(peer)) = (&kme, &qkd_peer) {
                    pool.spawn_refill(client.clone(), peer.clone(), qkd_pool.max(2));
                }
                let db = match &url {
                    Some(u) => {
                        Store::postgres(
                            u,
                            &store.schema()?,
                            &master,
                            pool.drawer(),
                            session_ttl,
                            16,
                        )
                        .await?
                    }
                    None => {
                        if synchronous == Synchronous::Normal {
                            tracing::warn!(
                                "--synchronous normal: answers leave before their commit is on disk"
                            );
                        }
                        Store::sqlite(
                            Path::new(&store.store),
                            &master,
                            pool.drawer(),
                            session_ttl,
                            match synchronous {
                                Synchronous::Full => Durability::Full,
                                Synchronous::Normal => Durability::Normal,
                            },
                        )?
                    }
                };
                let service = Arc::new(Service {
                    store: db,
                    config: ServerConfig {
                        max_skip,
                        session_ttl,
                        chargers,
                        ..ServerConfig::default()
                    },
                    kme,
                    metrics: Metrics::default(),
                });
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                let addr = listener.local_addr()?;
                if let Some(m) = metrics {
                    let l = tokio::net::TcpListener::bind(&m)
                        .await
                        .with_context(|| format!("metrics on {m}"))?;
                    println!("metrics on http://{}/metrics", l.local_addr()?);
                    tokio::spawn(serve_metrics(l, service.clone(), pool.clone()));
                }
                println!(
                    "key service listening on {addr} (store {}; session keys from {})",
                    if url.is_some() {
                        "PostgreSQL"
                    } else {
                        &store.store
                    },
                    match &qkd_peer {
                        Some(p) => format!("the QKD network via {p}, the CSPRNG when it has none"),
                        None => "the CSPRNG (no --qkd-peer)".into(),
                    }
                );
                tokio::select! {
                    () = serve(listener, service) => {}
                    r = tokio::signal::ctrl_c() => { r?; println!("key service stopped"); }
                }
                anyhow::Ok(())
            })
        }
        KeyserviceCommand::Enrol {
            store,
            identity,
            name,
        } => {
            let id = Identity::new(identity.clone())
                .map_err(|e| anyhow::anyhow!("{identity:?}: {e}"))?;
            store.open()?.enrol(&id, &name)?;
            println!("enrolled {id}; charge a medium whose owner is {id} to bind it");
            Ok(())
        }
        KeyserviceCommand::Subscribers { store, json } => {
            let subs = store.open()?.subscribers()?;
            if json {
                let v: Vec<_> = subs
                    .iter()
                    .map(|s| {
                        serde_json::json!({"identity": s.identity, "name": s.name,
                            "enrolled_at": s.enrolled_at,
                            "medium": s.medium.map(|m| m.to_string())})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            for s in subs {
                println!(
                    "{}  {}  medium {}",
                    s.identity,
                    if s.name.is_empty() { "-" } else { &s.name },
                    s.medium.map_or("none".into(), |m| m.to_string())
                );
            }
            Ok(())
        }
        KeyserviceCommand::Media { store, json } => {
            let media = store.open()?.media()?;
            if json {
                let v: Vec<_> = media
                    .iter()
                    .map(|m| {
                        serde_json::json!({"id": m.row.id.to_string(), "identity": m.row.identity,
                            "revoked": m.row.revoked, "next": m.row.next, "charged": m.row.charged,
                            "remaining": m.row.remaining(), "bound_at": m.bound_at,
                            "revoked_at": m.revoked_at, "revoke_reason": m.revoke_reason})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            for m in media {
                println!(
                    "{}  {}  {} keys remaining (next #{}, {} charged){}",
                    m.row.id,
                    m.row.identity,
                    m.row.remaining(),
                    m.row.next,
                    m.row.charged,
                    if m.row.revoked {
                        format!(
                            "  REVOKED: {}",
                            m.revoke_reason.as_deref().unwrap_or("no reason given")
                        )
                    } else {
                        String::new()
                    }
                );
            }
            Ok(())
        }
        KeyserviceCommand::Audit { store, limit } => {
            for a in store.open()?.audit_tail(limit)? {
                println!(
                    "{:>6}  {}  {:<7} {} {}  {}",
                    a.seq,
                    a.at,
                    a.event,
                    a.medium.map_or("-".into(), |m| m.to_string()),
                    a.identity.as_deref().unwrap_or("-"),
                    a.detail
                );
            }
            Ok(())
        }
    }
}

/// A minimal HTTP responder for `/metrics` (one request per connection).
async fn serve_metrics(l: tokio::net::TcpListener, service: Arc<Service>, pool: KeyPool) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let body = service.metrics.render(&pool);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        });
    }
}
