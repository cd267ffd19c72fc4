//! Bob's link port under attack, over loopback TCP with a real running link:
//! connections that do not know the link's secret must not end, replace or
//! starve the link's session (security review: twenty forged hellos in
//! twenty seconds stopped all key generation on core–north).
//!
//! Every wait is bounded and every assertion is on behaviour (sessions
//! started, blocks distilled, connections closed), not on how long anything
//! took.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qkdnet_link::block::ProtocolConfig;
use qkdnet_net::NetError;
use qkdnet_net::server::{self, BobLink, PortLimits};
use qkdnet_net::session::{
    Hello, KIND_CLASSICAL, KIND_QUANTUM, LinkParams, LinkStats, PROOF_BYTES, Pace, SessionEnd,
    Stop, alice_session,
};
use qkdnet_optics::device::Eve;
use qkdnet_optics::preset;

const LINK: &str = "core-north";

fn params(secret: u8) -> LinkParams {
    let link = preset::get("metro-1ghz")
        .expect("preset")
        .at_distance(20.0)
        .expect("distance");
    LinkParams {
        link_id: LINK.into(),
        proto: ProtocolConfig {
            eps_sec: link.postproc.eps_sec.get(),
            eps_cor: link.postproc.eps_cor.get(),
            classes: link.source.classes().iter().map(|c| (c.1, c.2)).collect(),
            ..Default::default()
        },
        link,
        eve: Eve::parse("none").expect("eve"),
        block_gates: 100_000_000,
        window: 4,
        bootstrap: Arc::new(zeroize::Zeroizing::new(vec![secret; 1024])),
        seed: Some(11),
        pass: None,
    }
}

/// Bob's link port serving one link.
struct Bob {
    addr: SocketAddr,
    stats: Arc<LinkStats>,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl Bob {
    fn start(p: &LinkParams, limits: PortLimits) -> Bob {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(LinkStats::default());
        let stop = Stop::new();
        let thread = server::start_with_limits(
            listener,
            vec![BobLink {
                params: p.clone(),
                stats: stats.clone(),
                sink: Arc::new(|_| {}),
            }],
            stop.clone(),
            limits,
        )
        .expect("link port");
        Bob {
            addr,
            stats,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Bob {
    fn drop(&mut self) {
        self.stop.fire();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Alice running one session against `addr` until stopped.
struct Alice {
    stats: Arc<LinkStats>,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<Result<SessionEnd, NetError>>>,
}

impl Alice {
    fn start(p: &LinkParams, addr: SocketAddr) -> Alice {
        let stats = Arc::new(LinkStats::default());
        let stop = Stop::new();
        let (p, s, st) = (p.clone(), stats.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Paced so the two ends share the test machine with other tests.
            let pace = Pace::RealTime { scale: 0.5 };
            alice_session(&p, addr, pace, None, &st, &s, &mut |_| {})
        });
        Alice {
            stats,
            stop,
            thread: Some(thread),
        }
    }

    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Alice {
    fn drop(&mut self) {
        self.stop.fire();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits (bounded) until `cond` holds; returns whether it did.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(300);
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn blocks(s: &LinkStats) -> u64 {
    s.blocks_ok.load(Relaxed) + s.blocks_aborted.load(Relaxed)
}

/// A deterministic "random" nonce for forger `i`.
fn nonce(i: u64) -> [u8; 32] {
    qkdnet_crypto::sm3::sm3(&i.to_le_bytes())
}

/// A forger's classical hello: the right link ID, its own nonce, no secret.
fn forged_hello(addr: SocketAddr, i: u64) -> (TcpStream, Hello) {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let h = Hello {
        kind: KIND_CLASSICAL,
        session: 1_700_000_000_000 + i,
        nonce: nonce(i),
        link_id: LINK.into(),
    };
    c.write_all(&h.encode()).expect("hello");
    let reply = Hello::read(&mut c).expect("Bob answers a well-formed hello");
    (c, reply)
}

/// Whether Bob closed `c` (end of stream or reset) rather than sending more.
fn closed_by_bob(c: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(c.read(&mut b), Ok(0) | Err(_))
}

/// Regression (review finding "an unauthenticated hello kills a running QKD
/// link"): twenty forged classical hellos, each answered by Bob and followed
/// by a garbage proof or by nothing, while a real session runs. Before the
/// fix the first of them ended the session.
#[test]
fn forged_hellos_do_not_stop_a_running_session() {
    let p = params(7);
    let bob = Bob::start(&p, PortLimits::default());
    let alice = Alice::start(&p, bob.addr);
    assert!(
        eventually(|| blocks(&bob.stats) >= 1),
        "the link never made a block"
    );

    let mut idle = Vec::new();
    for i in 0..20 {
        let (mut c, reply) = forged_hello(bob.addr, i);
        assert_eq!(reply.link_id, LINK);
        if i % 2 == 0 {
            // A wrong proof: refused, the connection closed.
            c.write_all(&nonce(1000 + i)).expect("proof");
            assert!(closed_by_bob(&mut c), "forger {i} was not cut off");
        } else {
            // No proof at all: the connection just sits there.
            idle.push(c);
        }
    }
    let after_flood = blocks(&bob.stats);
    assert!(
        eventually(|| blocks(&bob.stats) >= after_flood + 2 || !alice.running()),
        "the link stopped making blocks"
    );
    assert!(alice.running(), "Alice's session ended");
    assert!(blocks(&bob.stats) >= after_flood + 2);
    assert!(blocks(&alice.stats) >= 1);
    assert_eq!(
        bob.stats.sessions.load(Relaxed),
        1,
        "Bob's session was replaced"
    );
    assert_eq!(bob.stats.up.load(Relaxed), 1);
    assert_eq!(alice.stats.sessions.load(Relaxed), 1);
    drop(idle);
}

/// A peer that runs the whole handshake correctly but holds another secret
/// (a wrong proof, not random bytes) is refused and the real session goes on;
/// so is a quantum connection that claims a session without its tag.
#[test]
fn a_hello_with_a_wrong_proof_is_refused_and_the_session_continues() {
    let p = params(7);
    let bob = Bob::start(&p, PortLimits::default());
    let alice = Alice::start(&p, bob.addr);
    assert!(
        eventually(|| blocks(&bob.stats) >= 1),
        "the link never made a block"
    );

    let impostor = params(8); // same link, other secret
    let stop = Stop::new();
    let stats = Arc::new(LinkStats::default());
    let r = alice_session(
        &impostor,
        bob.addr,
        Pace::Unpaced,
        Some(1),
        &stop,
        &stats,
        &mut |_| {},
    );
    assert!(r.is_err(), "an impostor got a session: {:?}", r.map(|_| ()));
    assert_eq!(stats.sessions.load(Relaxed), 0);

    // A quantum hello with a made-up tag, for a session that may or may not exist.
    let mut q = TcpStream::connect(bob.addr).expect("connect");
    q.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut wire = Hello {
        kind: KIND_QUANTUM,
        session: 1,
        nonce: nonce(1),
        link_id: LINK.into(),
    }
    .encode();
    wire.extend_from_slice(&[0u8; PROOF_BYTES]);
    q.write_all(&wire).expect("quantum hello");
    assert!(closed_by_bob(&mut q));

    let before = blocks(&bob.stats);
    assert!(
        eventually(|| blocks(&bob.stats) >= before + 2 || !alice.running()),
        "the link stopped making blocks"
    );
    assert!(alice.running(), "Alice's session ended");
    assert_eq!(
        bob.stats.sessions.load(Relaxed),
        1,
        "Bob's session was replaced"
    );
    assert_eq!(alice.stats.sessions.load(Relaxed), 1);
}

/// Alice will not run a session with a Bob that cannot prove the secret.
#[test]
fn alice_refuses_a_bob_without_the_secret() {
    let bob = Bob::start(&params(8), PortLimits::default());
    let stop = Stop::new();
    let stats = Arc::new(LinkStats::default());
    let r = alice_session(
        &params(7),
        bob.addr,
        Pace::Unpaced,
        Some(1),
        &stop,
        &stats,
        &mut |_| {},
    );
    match r {
        Err(NetError::Peer(_)) => {}
        r => panic!("expected a refused handshake, got {:?}", r.map(|_| ())),
    }
    assert_eq!(stats.sessions.load(Relaxed), 0);
    assert_eq!(bob.stats.sessions.load(Relaxed), 0);
}

/// Idle unauthenticated connections that fill the port's bounds do not lock
/// Alice out: a new connection closes the oldest pending one (from the same
/// address, here all loopback), so her session still starts and distils.
#[test]
fn idle_connections_filling_the_port_do_not_lock_alice_out() {
    let limits = PortLimits {
        max_preauth: 8,
        max_preauth_per_addr: 4,
        // Long enough that only eviction, not the timeout, can close them here.
        preauth_timeout: Duration::from_secs(600),
    };
    let p = params(7);
    let bob = Bob::start(&p, limits);
    let mut idle = Vec::new();
    for i in 0..3 * limits.max_preauth as u64 {
        let (c, _) = forged_hello(bob.addr, i);
        idle.push(c);
    }
    // Bob answered every one of them, so he has accepted them all: at most
    // four are still pending and the oldest were closed.
    assert!(
        closed_by_bob(&mut idle[0]),
        "the oldest idle connection is still open"
    );

    let stop = Stop::new();
    let stats = Arc::new(LinkStats::default());
    let r = alice_session(
        &p,
        bob.addr,
        Pace::Unpaced,
        Some(1),
        &stop,
        &stats,
        &mut |_| {},
    );
    assert!(
        matches!(r, Ok(SessionEnd::Finished)),
        "Alice was locked out: {:?}",
        r.map(|_| ())
    );
    assert_eq!(blocks(&stats), 1);
    assert_eq!(bob.stats.sessions.load(Relaxed), 1);
    drop(idle);
}

/// A connection that says nothing is closed once its handshake time is up.
#[test]
fn a_silent_connection_is_closed_after_the_handshake_timeout() {
    let limits = PortLimits {
        preauth_timeout: Duration::from_millis(200),
        ..PortLimits::default()
    };
    let bob = Bob::start(&params(7), limits);
    let mut c = TcpStream::connect(bob.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    assert!(closed_by_bob(&mut c));
    // One that trickles its hello a byte at a time gets no longer.
    let mut c = TcpStream::connect(bob.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let hello = Hello {
        kind: KIND_CLASSICAL,
        session: 1,
        nonce: nonce(1),
        link_id: LINK.into(),
    }
    .encode();
    let mut cut_off = false;
    for b in &hello {
        if c.write_all(&[*b]).is_err() {
            cut_off = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cut_off || closed_by_bob(&mut c));
}
