//! Bob's link port: one TCP listener per node that accepts the sessions of
//! all the node's links where it plays Bob, pairs each classical connection
//! with its quantum one (same link, session and nonce) and runs
//! [`bob_session`] on them. A new classical connection for a link ends that
//! link's previous session (Alice restarted or lost the connection).

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qkdnet_link::endpoint::Event;

use crate::NetError;
use crate::session::{Hello, LinkParams, LinkStats, Stop, bob_reply, bob_session};

/// A callback that takes each finished block of a link.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// One link served as Bob.
pub struct BobLink {
    /// Shared parameters.
    pub params: LinkParams,
    /// Counters.
    pub stats: Arc<LinkStats>,
    /// Where finished blocks go.
    pub sink: EventSink,
}

struct Slot {
    link: BobLink,
    current: Mutex<Option<Arc<Stop>>>,
}

type Pending = Mutex<HashMap<(String, u64), SyncSender<(TcpStream, [u8; 32])>>>;

struct Shared {
    links: HashMap<String, Slot>,
    pending: Pending,
    stop: Arc<Stop>,
}

/// Serves `links` on `listener` until `stop` fires. Returns the accept thread.
pub fn start(
    listener: TcpListener,
    links: Vec<BobLink>,
    stop: Arc<Stop>,
) -> Result<std::thread::JoinHandle<()>, NetError> {
    listener.set_nonblocking(true)?;
    let shared = Arc::new(Shared {
        links: links
            .into_iter()
            .map(|l| {
                (
                    l.params.link_id.clone(),
                    Slot {
                        link: l,
                        current: Mutex::new(None),
                    },
                )
            })
            .collect(),
        pending: Mutex::new(HashMap::new()),
        stop,
    });
    Ok(std::thread::Builder::new()
        .name("link-port".into())
        .spawn(move || accept_loop(&listener, &shared))?)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.fired() {
        match listener.accept() {
            Ok((stream, from)) => {
                let sh = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("link-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(stream, &sh) {
                            tracing::warn!(%from, error = %e, "link connection ended");
                        }
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(e) => {
                tracing::warn!(error = %e, "link port accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    for slot in shared.links.values() {
        if let Some(s) = slot.current.lock().ok().and_then(|mut g| g.take()) {
            s.fire();
        }
    }
}

fn handle(mut stream: TcpStream, sh: &Arc<Shared>) -> Result<(), NetError> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let hello = Hello::read(&mut stream)?;
    stream.set_read_timeout(None)?;
    let Some(slot) = sh.links.get(&hello.link_id) else {
        return Err(NetError::Peer(format!(
            "session for unknown link '{}'",
            hello.link_id
        )));
    };
    let key = (hello.link_id.clone(), hello.session);
    if !hello.is_classical() {
        let tx = sh
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&key))
            .ok_or_else(|| {
                NetError::Peer(format!(
                    "quantum connection for link '{}' without a classical session",
                    hello.link_id
                ))
            })?;
        let _ = tx.send((stream, hello.nonce));
        return Ok(());
    }
    // A new classical session replaces the link's previous one.
    let stop = sh.stop.child();
    if let Ok(mut cur) = slot.current.lock() {
        if let Some(old) = cur.replace(stop.clone()) {
            old.fire();
        }
    }
    let (tx, rx): (_, Receiver<(TcpStream, [u8; 32])>) = sync_channel(1);
    if let Ok(mut p) = sh.pending.lock() {
        p.insert(key.clone(), tx);
    }
    let bob_nonce = bob_reply(&slot.link.params, &mut stream, &hello)?;
    let quantum = rx.recv_timeout(Duration::from_secs(10));
    if let Ok(mut p) = sh.pending.lock() {
        p.remove(&key);
    }
    let (quantum, nonce) = quantum.map_err(|_| {
        NetError::Peer(format!(
            "link '{}': no quantum connection for session {}",
            hello.link_id, hello.session
        ))
    })?;
    if nonce != hello.nonce {
        return Err(NetError::Peer(format!(
            "link '{}': quantum connection does not match the session",
            hello.link_id
        )));
    }
    let l = &slot.link;
    let sink = l.sink.clone();
    let r = bob_session(
        &l.params,
        stream,
        &hello,
        bob_nonce,
        quantum,
        &stop,
        &l.stats,
        &mut |e| sink(e),
    );
    tracing::info!(link = %hello.link_id, session = hello.session, outcome = ?r, "Bob session ended");
    r.map(|_| ())
}
