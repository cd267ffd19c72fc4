//! The key service's network front: plain TCP (the network is untrusted; the
//! protocol authenticates every request with a medium key) carrying
//! [`qkdnet_media::proto`] frames.
//!
//! A connection is a loop: the service sends a fresh random challenge; the peer
//! sends one request, a terminal's [`AuthRequest`] or a charging point's
//! [`ChargeOffer`]; the service answers and, in the same write, sends the next
//! challenge, so a terminal that keeps its connection pays one round trip per
//! request. A peer that sends garbage is told `Malformed` and dropped; one that
//! says nothing for [`ServerConfig::idle_timeout`] is dropped; at most
//! [`ServerConfig::max_connections`] connections are served at once (the next
//! wait in the kernel's backlog).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use qkdnet_etsi::client::EtsiClient;
use qkdnet_media::Key256;
use qkdnet_media::proto::{
    AuthRequest, CHALLENGE_LEN, Challenge, ChargeAck, ChargeOffer, KeySource, Message, RefuseReason,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::error::KsError;
use crate::qkd::KeyPool;
use crate::store::{GrantOp, Store};
use qkdnet_terminal::TerminalError;
use qkdnet_terminal::wire::{read_message, write_messages};

/// How the server behaves.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Keys a terminal may be ahead of the service (0: strict).
    pub max_skip: u64,
    /// Seconds a session can be joined after it is opened.
    pub session_ttl: u64,
    /// Most connections served at once.
    pub max_connections: usize,
    /// A connection idle this long is closed.
    pub idle_timeout: Duration,
    /// Charging points allowed to charge (SAE IDs); empty: any SAE the service's
    /// KME will hand keys from.
    pub chargers: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_skip: 64,
            session_ttl: 300,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(60),
            chargers: Vec::new(),
        }
    }
}

/// Counters for the metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Session keys granted (opened or joined).
    pub grants: AtomicU64,
    /// Grants whose key came from the QKD network.
    pub grants_qkd: AtomicU64,
    /// Requests refused, by reason (index = wire byte - 1).
    pub refused: [AtomicU64; 16],
    /// Charges stored.
    pub charges: AtomicU64,
    /// Keys charged.
    pub keys_charged: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

impl Metrics {
    fn refuse(&self, r: RefuseReason) {
        if let Some(i) = RefuseReason::ALL.iter().position(|x| *x == r) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prometheus text exposition of the counters and the QKD pool.
    pub fn render(&self, pool: &KeyPool) -> String {
        use core::fmt::Write;
        let mut s = String::new();
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "# TYPE qkdnet_keyservice_grants_total counter\nqkdnet_keyservice_grants_total{{source=\"qkd\"}} {}\nqkdnet_keyservice_grants_total{{source=\"csprng\"}} {}",
            c(&self.grants_qkd),
            c(&self.grants) - c(&self.grants_qkd)
        );
        let _ = writeln!(
            s,
            "# TYPE qkdnet_keyservice_session_keys_total counter\nqkdnet_keyservice_session_keys_total{{source=\"qkd\"}} {}\nqkdnet_keyservice_session_keys_total{{source=\"csprng\"}} {}",
            c(&pool.stats.qkd),
            c(&pool.stats.csprng)
        );
        let _ = writeln!(s, "# TYPE qkdnet_keyservice_refused_total counter");
        for (i, r) in RefuseReason::ALL.iter().enumerate() {
            let _ = writeln!(
                s,
                "qkdnet_keyservice_refused_total{{reason=\"{r:?}\"}} {}",
                c(&self.refused[i])
            );
        }
        let _ = writeln!(
            s,
            "# TYPE qkdnet_keyservice_charges_total counter\nqkdnet_keyservice_charges_total {}\n# TYPE qkdnet_keyservice_keys_charged_total counter\nqkdnet_keyservice_keys_charged_total {}\n# TYPE qkdnet_keyservice_qkd_pool_keys gauge\nqkdnet_keyservice_qkd_pool_keys {}\n# TYPE qkdnet_keyservice_connections_total counter\nqkdnet_keyservice_connections_total {}",
            c(&self.charges),
            c(&self.keys_charged),
            pool.level(),
            c(&self.connections)
        );
        s
    }
}

/// Everything a connection needs.
#[derive(Debug)]
pub struct Service {
    /// The store.
    pub store: Store,
    /// Behaviour.
    pub config: ServerConfig,
    /// The service's SAE client to its KME (fetches charged keys by ID).
    pub kme: Option<EtsiClient>,
    /// Counters.
    pub metrics: Metrics,
}

/// Serves `listener` for ever.
pub async fn serve(listener: TcpListener, service: Arc<Service>) {
    let slots = Arc::new(Semaphore::new(service.config.max_connections.max(1)));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("key service: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        service.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let service = service.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &service).await {
                tracing::debug!("key service: {peer}: {e}");
            }
            drop(permit);
        });
    }
}

fn challenge() -> Challenge {
    let mut c = [0u8; CHALLENGE_LEN];
    crate::nonce::fill_public(&mut c);
    Challenge { challenge: c }
}

async fn connection(stream: TcpStream, service: &Service) -> Result<(), KsError> {
    let _ = stream.set_nodelay(true);
    let (reader, mut stream) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(reader);
    let mut ch = challenge();
    write_messages(&mut stream, &[Message::Challenge(ch)]).await?;
    loop {
        let msg = match read_message(&mut reader, service.config.idle_timeout).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e @ TerminalError::Proto(_)) => {
                service.metrics.refuse(RefuseReason::Malformed);
                let _ =
                    write_messages(&mut stream, &[Message::Refused(RefuseReason::Malformed)]).await;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let answer = match msg {
            Message::AuthRequest(req) => terminal_request(service, ch, req).await,
            Message::ChargeOffer(offer) => charge(service, ch, offer).await,
            _ => Message::Refused(RefuseReason::Malformed),
        };
        if let Message::Refused(r) = &answer {
            service.metrics.refuse(*r);
            if *r == RefuseReason::Malformed {
                let _ = write_messages(&mut stream, &[answer]).await;
                return Ok(());
            }
        }
        ch = challenge();
        write_messages(&mut stream, &[answer, Message::Challenge(ch)]).await?;
    }
}

async fn terminal_request(service: &Service, challenge: Challenge, req: AuthRequest) -> Message {
    let mut nonce = [0u8; 12];
    crate::nonce::fill_public(&mut nonce);
    let op = GrantOp {
        challenge,
        req,
        nonce,
        max_skip: service.config.max_skip,
        session_ttl: service.config.session_ttl,
    };
    match service.store.grant(op).await {
        Ok(plan) => match plan.answer {
            Ok(g) => {
                service.metrics.grants.fetch_add(1, Ordering::Relaxed);
                if plan.source == Some(KeySource::Qkd) {
                    service.metrics.grants_qkd.fetch_add(1, Ordering::Relaxed);
                }
                Message::SessionKeyGrant(g)
            }
            Err(r) => Message::Refused(r),
        },
        Err(e) => {
            tracing::warn!("key service: request not served: {e}");
            Message::Refused(RefuseReason::Unavailable)
        }
    }
}

async fn charge(service: &Service, challenge: Challenge, offer: ChargeOffer) -> Message {
    let refuse = |why: &str, r: RefuseReason| {
        tracing::warn!(
            "key service: charge of medium {} by {} refused: {why}",
            offer.terms.medium_id,
            offer.terms.charger
        );
        Message::Refused(r)
    };
    if !service.config.chargers.is_empty()
        && !service.config.chargers.contains(&offer.terms.charger)
    {
        return refuse(
            "not an allowed charging point",
            RefuseReason::ChargeRejected,
        );
    }
    let Some(kme) = &service.kme else {
        return refuse(
            "the service has no KME to fetch keys from",
            RefuseReason::ChargeRejected,
        );
    };
    let ids: Vec<_> = std::iter::once(offer.terms.auth_key_id)
        .chain(offer.terms.key_ids.iter().copied())
        .collect();
    let fetched = match kme.dec_keys(&offer.terms.charger, &ids).await {
        Ok(k) => k,
        Err(e) => {
            return refuse(
                &format!("its keys could not be fetched by ID: {e}"),
                RefuseReason::ChargeRejected,
            );
        }
    };
    let Ok(mut keys) = fetched
        .iter()
        .map(|k| Key256::from_slice(&k.material))
        .collect::<Result<Vec<_>, _>>()
    else {
        return refuse("its keys are not 256 bits", RefuseReason::ChargeRejected);
    };
    let auth_key = keys.remove(0);
    if offer.verify(&challenge, &auth_key).is_err() {
        return refuse("the offer's tag does not verify", RefuseReason::BadTag);
    }
    let n = keys.len() as u64;
    let ack = ChargeAck::for_offer(&offer, &challenge, &auth_key);
    match service.store.charge(offer.clone(), keys).await {
        Ok(Ok(())) => {
            service.metrics.charges.fetch_add(1, Ordering::Relaxed);
            service.metrics.keys_charged.fetch_add(n, Ordering::Relaxed);
            Message::ChargeAck(ack)
        }
        Ok(Err(r)) => refuse(&r.to_string(), r),
        Err(e) => refuse(&e.to_string(), RefuseReason::Unavailable),
    }
}
