//! Bob's link port: one TCP listener per node that accepts the sessions of
//! all the node's links where it plays Bob, pairs each classical connection
//! with its quantum one and runs [`bob_session`] on them.
//!
//! **Nothing before authentication.** A connection is anonymous until its
//! handshake proves knowledge of the link's bootstrap secret (the protocol is
//! in [`crate::session`]). Until then it may not end the link's session, be
//! paired, or hold more than a bounded share of the port:
//!
//! * only a classical connection whose proof verified ends the link's previous
//!   session (Alice restarted or lost the connection) and opens a slot for
//!   its quantum connection, which is paired only if its own tag verifies;
//! * the whole pre-authentication phase of a connection (hello, proof, or
//!   quantum hello and tag) must finish within [`PREAUTH_TIMEOUT`], measured
//!   from accept, however slowly the bytes trickle in;
//! * at most [`MAX_PREAUTH`] connections are in that phase at once, at most
//!   [`MAX_PREAUTH_PER_ADDR`] from one IP address. A new connection over
//!   either bound closes the *oldest* pending one (from its own address if
//!   that is the bound it hit) rather than being refused: a real handshake
//!   takes one round trip, so a flood has to open connections faster than
//!   one per round trip per slot to keep Alice out, while a refuse-new policy
//!   would lock her out for as long as a few idle sockets stay open. The
//!   threads serving pre-authentication connections (closed ones finish
//!   within moments) are capped at twice [`MAX_PREAUTH`]; past that a new
//!   connection is closed at once.
//!
//! Refused handshakes are logged with a running count, on the 1st, 2nd, 4th,
//! 8th... so a flood cannot flood the log.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qkdnet_link::endpoint::Event;

use crate::NetError;
use crate::session::{
    Hello, LinkParams, LinkStats, QuantumGate, QuantumStream, Stop, bob_reply, bob_session,
    read_proof,
};

/// A callback that takes each finished block of a link.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// Most connections in the pre-authentication phase at once (module docs).
pub const MAX_PREAUTH: usize = 32;
/// Most pre-authentication connections from one IP address.
pub const MAX_PREAUTH_PER_ADDR: usize = 8;
/// How long a connection may take from accept to a verified proof (or tag).
pub const PREAUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds on unauthenticated connections (module docs); [`Default`] is what
/// a node uses ([`MAX_PREAUTH`], [`MAX_PREAUTH_PER_ADDR`], [`PREAUTH_TIMEOUT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortLimits {
    /// Most connections in the pre-authentication phase at once.
    pub max_preauth: usize,
    /// Most of them from one IP address.
    pub max_preauth_per_addr: usize,
    /// Time from accept to a verified proof (or quantum tag).
    pub preauth_timeout: Duration,
}

impl Default for PortLimits {
    fn default() -> PortLimits {
        PortLimits {
            max_preauth: MAX_PREAUTH,
            max_preauth_per_addr: MAX_PREAUTH_PER_ADDR,
            preauth_timeout: PREAUTH_TIMEOUT,
        }
    }
}
/// How long an authenticated classical connection waits for its quantum one.
const QUANTUM_WAIT: Duration = Duration::from_secs(10);

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

/// Authenticated classical sessions waiting for their quantum connection.
type Pending = Mutex<HashMap<(String, u64), (QuantumGate, SyncSender<QuantumStream>)>>;

/// Connections not yet authenticated, oldest first.
#[derive(Default)]
struct Preauth {
    entries: Mutex<Vec<PreauthEntry>>,
    next_id: AtomicU64,
    /// Threads serving pre-authentication connections (evicted ones included
    /// until they notice).
    threads: AtomicUsize,
}

struct PreauthEntry {
    id: u64,
    addr: IpAddr,
    /// A handle to shut the connection down when it is evicted.
    stream: TcpStream,
}

/// A connection's place in [`Preauth`]; leaving (drop) frees it.
struct PreauthGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for PreauthGuard {
    fn drop(&mut self) {
        let p = &self.shared.preauth;
        if let Ok(mut v) = p.entries.lock() {
            v.retain(|e| e.id != self.id);
        }
        p.threads.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Shared {
    links: HashMap<String, Slot>,
    pending: Pending,
    preauth: Preauth,
    /// Handshakes refused so far (for log throttling).
    refused: AtomicU64,
    limits: PortLimits,
    stop: Arc<Stop>,
}

/// Serves `links` on `listener` until `stop` fires. Returns the accept thread.
pub fn start(
    listener: TcpListener,
    links: Vec<BobLink>,
    stop: Arc<Stop>,
) -> Result<std::thread::JoinHandle<()>, NetError> {
    start_with_limits(listener, links, stop, PortLimits::default())
}

/// [`start`] with other bounds on unauthenticated connections (tests).
pub fn start_with_limits(
    listener: TcpListener,
    links: Vec<BobLink>,
    stop: Arc<Stop>,
    limits: PortLimits,
) -> Result<std::thread::JoinHandle<()>, NetError> {
    if limits.max_preauth == 0 || limits.max_preauth_per_addr == 0 {
        return Err(NetError::Config(
            "link port: pre-authentication limits must be at least 1".into(),
        ));
    }
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
        preauth: Preauth::default(),
        refused: AtomicU64::new(0),
        limits,
        stop,
    });
    Ok(std::thread::Builder::new()
        .name("link-port".into())
        .spawn(move || accept_loop(&listener, &shared))?)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.fired() {
        match listener.accept() {
            Ok((stream, from)) => accept(stream, from, shared),
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

/// Enters a new connection in the pre-authentication table (evicting the
/// oldest pending one if a bound is reached) and starts its thread; closes it
/// at once if too many pre-authentication threads are still running.
fn accept(stream: TcpStream, from: SocketAddr, sh: &Arc<Shared>) {
    let p = &sh.preauth;
    let limits = &sh.limits;
    if p.threads.load(Ordering::SeqCst) >= 2 * limits.max_preauth {
        refused(
            sh,
            from,
            &NetError::Peer("too many handshakes in progress".into()),
        );
        return; // dropping the stream closes it
    }
    let Ok(ctl) = stream.try_clone() else {
        return;
    };
    let id = p.next_id.fetch_add(1, Ordering::Relaxed);
    let addr = from.ip();
    if let Ok(mut v) = p.entries.lock() {
        let same = v.iter().filter(|e| e.addr == addr).count();
        let evict = if same >= limits.max_preauth_per_addr {
            v.iter().position(|e| e.addr == addr)
        } else if v.len() >= limits.max_preauth {
            Some(0)
        } else {
            None
        };
        if let Some(i) = evict {
            let old = v.remove(i);
            let _ = old.stream.shutdown(std::net::Shutdown::Both);
        }
        v.push(PreauthEntry {
            id,
            addr,
            stream: ctl,
        });
    }
    p.threads.fetch_add(1, Ordering::SeqCst);
    let guard = PreauthGuard {
        shared: sh.clone(),
        id,
    };
    let sh = sh.clone();
    // On a spawn failure the closure, and so the guard and the stream, are dropped.
    let _ = std::thread::Builder::new()
        .name("link-conn".into())
        .spawn(move || {
            if let Err(e) = handle(stream, from, &sh, guard) {
                tracing::warn!(%from, error = %e, "link connection ended");
            }
        });
}

/// Logs a refused handshake on the 1st, 2nd, 4th, 8th... refusal.
fn refused(sh: &Shared, from: SocketAddr, e: &NetError) {
    let n = sh.refused.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(%from, error = %e, refused_so_far = n, "link handshake refused");
    }
}

/// Reads with a deadline for the whole exchange, not per read, so a peer
/// that trickles bytes cannot stretch it.
struct Deadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "handshake not finished in time",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

/// Serves one connection: its handshake while `guard` holds its
/// pre-authentication place, then (classical) its session.
fn handle(
    stream: TcpStream,
    from: SocketAddr,
    sh: &Arc<Shared>,
    guard: PreauthGuard,
) -> Result<(), NetError> {
    let timeout = sh.limits.preauth_timeout;
    let until = Instant::now() + timeout;
    let handshake = (|| -> Result<Handshake<'_>, NetError> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(timeout))?;
        let mut rd = Deadline {
            stream: &stream,
            until,
        };
        let hello = Hello::read(&mut rd)?;
        let Some(slot) = sh.links.get(&hello.link_id) else {
            return Err(NetError::Peer(format!(
                "session for unknown link '{}'",
                hello.link_id
            )));
        };
        if !hello.is_classical() {
            let tag = read_proof(&mut rd)?;
            return Ok(Handshake::Quantum(hello, tag));
        }
        let mut w = &stream;
        let hs = bob_reply(&slot.link.params, &mut w, hello)?;
        let auth = hs.read_alice_proof(&mut rd)?;
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        Ok(Handshake::Classical(slot, auth))
    })();
    let handshake = match handshake {
        Ok(h) => h,
        Err(e) => {
            refused(sh, from, &e);
            return Ok(());
        }
    };
    let (slot, auth) = match handshake {
        Handshake::Quantum(hello, tag) => {
            let r = admit_quantum(stream, &hello, &tag, sh);
            if let Err(e) = &r {
                refused(sh, from, e);
            }
            return Ok(());
        }
        Handshake::Classical(slot, auth) => (slot, auth),
    };
    drop(guard); // authenticated: off the pre-authentication bounds

    // Alice proved the link's secret: her new session replaces the previous one.
    let stop = sh.stop.child();
    if let Ok(mut cur) = slot.current.lock() {
        if let Some(old) = cur.replace(stop.clone()) {
            old.fire();
        }
    }
    let key = (auth.link_id().to_owned(), auth.session());
    let (tx, rx): (_, Receiver<QuantumStream>) = sync_channel(1);
    if let Ok(mut p) = sh.pending.lock() {
        p.insert(key.clone(), (auth.quantum_gate(), tx));
    }
    // Alice opens the quantum connection once she has checked this proof, so
    // the slot above is in place before it can arrive.
    let sent = auth.send_proof(&mut &stream);
    let quantum = match sent {
        Ok(()) => rx.recv_timeout(QUANTUM_WAIT).ok(),
        Err(_) => None,
    };
    if let Ok(mut p) = sh.pending.lock() {
        p.remove(&key);
    }
    sent?;
    let quantum = quantum.ok_or_else(|| {
        NetError::Peer(format!(
            "link '{}': no quantum connection for session {}",
            key.0, key.1
        ))
    })?;
    let l = &slot.link;
    let sink = l.sink.clone();
    let r = bob_session(
        &l.params,
        auth,
        stream,
        quantum,
        &stop,
        &l.stats,
        &mut |e| sink(e),
    );
    tracing::info!(link = %key.0, session = key.1, outcome = ?r, "Bob session ended");
    r.map(|_| ())
}

enum Handshake<'a> {
    Classical(&'a Slot, crate::session::BobAuthenticated),
    Quantum(Hello, [u8; crate::session::PROOF_BYTES]),
}

/// Hands a quantum connection to its authenticated classical session if its
/// tag verifies; a connection that does not leaves the session's slot as it was.
fn admit_quantum(
    stream: TcpStream,
    hello: &Hello,
    tag: &[u8; crate::session::PROOF_BYTES],
    sh: &Shared,
) -> Result<(), NetError> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    let key = (hello.link_id.clone(), hello.session);
    let mut pending = sh
        .pending
        .lock()
        .map_err(|_| NetError::Internal("pending sessions lock poisoned".into()))?;
    let Some((gate, _)) = pending.get(&key) else {
        return Err(NetError::Peer(format!(
            "quantum connection for link '{}' without an authenticated classical session",
            hello.link_id
        )));
    };
    let q = gate.admit(hello, tag, stream)?;
    if let Some((_, tx)) = pending.remove(&key) {
        // Capacity 1 and the entry is gone, so this is the only send.
        let _ = tx.try_send(q);
    }
    Ok(())
}
