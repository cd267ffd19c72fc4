//! QKD link sessions between two processes: the TCP adapter that joins the
//! simulated optics ([`crate::quantum`]) and the sans-IO post-processing engine
//! (`qkdnet_link::endpoint`) into a running link.
//!
//! A session is two TCP connections from Alice's node to Bob's link port:
//!
//! * **classical**: the authenticated post-processing protocol
//!   (`qkdnet_link::tcp`), preceded by a cleartext hello each way;
//! * **quantum**: the emulated fibre carrying Bob's detections
//!   ([`crate::quantum`]), preceded by Alice's hello naming the session.
//!
//! **Handshake** (protocol version 2; all integers little-endian unless
//! marked BE). Hello, both kinds: `"QKDNET-LINK\x02"` (magic and version),
//! `u8` kind (1 classical, 2 quantum), `u64` session number (Alice's clock in
//! ms when she opened it), 32-byte nonce, `u16` length and the link ID (1 to
//! [`MAX_LINK_ID`] bytes): at most 55 + 128 bytes, read with a fixed-size
//! head and a bounded tail. Then:
//!
//! ```text
//! classical   A -> B  hello(classical, s, N_A)
//!             B -> A  hello(classical, s, N_B)          N_B fresh from Bob
//!             A -> B  P_A = HMAC-SM3(K, "qkdnet/link/hello/alice/v2" || T)
//!             B -> A  P_B = HMAC-SM3(K, "qkdnet/link/hello/bob/v2"   || T)
//!             ...     post-processing frames (qkdnet_link::tcp)
//! quantum     A -> B  hello(quantum, s, N_A) || Q = HMAC-SM3(K, "qkdnet/link/hello/quantum/v2" || T)
//!             ...     detection frames (crate::quantum)
//!
//! T = u32 BE len(link ID) || link ID || u64 BE s || N_A || N_B
//! K = SM3 KDF (X9.63 form) of the bootstrap secret, info "qkdnet/link/hello-key/v2", 32 bytes
//! ```
//!
//! Why: a connection to Bob's link port is anonymous until it proves it knows
//! the link's bootstrap secret, and it must not disturb anything before then
//! (security review: twenty forged hellos in twenty seconds used to stop a
//! running link, because each one replaced the link's session). Bob checks
//! `P_A` in constant time, and only then ends the link's previous session,
//! answers with `P_B` and waits for the quantum connection, which he pairs
//! only if its `Q` verifies for the same transcript. `N_B` is fresh, so a
//! recorded handshake does not replay; the three labels keep each tag to its
//! role, so Bob's `P_B` cannot be reflected as an Alice proof; and Bob sends
//! `P_B` only to a peer that proved itself, so he is no tag oracle for
//! strangers. Alice checks `P_B` before opening the quantum connection, so a
//! fake Bob gets neither the fibre nor a session. `K` is derived under its
//! own label, independent of the session pads below. The types follow the
//! states: [`bob_reply`] gives a [`BobHandshake`], only
//! [`BobHandshake::read_alice_proof`] gives a [`BobAuthenticated`], only its
//! [`QuantumGate`] admits a [`QuantumStream`], and [`bob_session`] needs both.
//! Limits on unauthenticated connections (how many, how long) are the link
//! port's ([`crate::server`]).
//!
//! **Authentication keys.** Within a session the classical channel is
//! authenticated by Wegman–Carter tags whose one-time pads are refilled from
//! distilled key. A new session (after a restart or a broken connection) cannot
//! safely continue the previous session's pad stream, because either side may
//! have died in the middle of using it, so each session's initial pads are
//! derived with the GB/T 32918 SM3 KDF (X9.63 form) from the bootstrap secret,
//! the link ID, the session number and both nonces.
//! That derivation is computationally secure, not information-theoretically:
//! the docs say so. The bootstrap secret never leaves the two nodes' state
//! directories.
//!
//! **Block numbers** are `session × 1 000 000 + k`, so a block number is never
//! reused on a link across sessions, and the KME-level key IDs derived from it
//! (`qkdnet_kms::block::unit_id`) stay unique. A session that breaks drops its
//! half-finished blocks on both sides; a block one side finished and the other
//! did not is caught by the KMEs when a key from it is first reserved.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qkdnet_crypto::sm3::{HmacSm3, SM3_LEN};
use qkdnet_link::block::{BlockReport, ProtocolConfig};
use qkdnet_link::endpoint::{Endpoint, Event};
use qkdnet_link::tcp::{BlockInput, Connection, Feed, drive_alice, drive_bob_live};
use qkdnet_optics::device::{Eve, LinkConfig};
use qkdnet_optics::record::Span;
use qkdnet_optics::sim::Simulator;
use zeroize::Zeroizing;

use crate::NetError;
use crate::quantum;

/// Hello magic; the last byte is the handshake's protocol version.
const MAGIC: &[u8; 12] = b"QKDNET-LINK\x02";
/// Hello kind of a classical connection.
pub const KIND_CLASSICAL: u8 = 1;
/// Hello kind of a quantum connection.
pub const KIND_QUANTUM: u8 = 2;
/// Bytes of a handshake proof (an HMAC-SM3 tag; module docs).
pub const PROOF_BYTES: usize = SM3_LEN;
const HELLO_KEY_INFO: &[u8] = b"qkdnet/link/hello-key/v2";
const LABEL_ALICE: &[u8] = b"qkdnet/link/hello/alice/v2";
const LABEL_BOB: &[u8] = b"qkdnet/link/hello/bob/v2";
const LABEL_QUANTUM: &[u8] = b"qkdnet/link/hello/quantum/v2";
/// Bytes of per-session authentication pads derived from the bootstrap secret
/// (32 768 tags per direction: enough for the first blocks of Cascade rounds,
/// after which distilled key refills the pads).
const SESSION_AUTH_BYTES: usize = 1 << 20;
/// Blocks per session number (block = session × this + k).
pub const BLOCKS_PER_SESSION: u64 = 1_000_000;
/// Longest link ID.
pub const MAX_LINK_ID: usize = 128;
/// Shortest bootstrap secret accepted.
pub const MIN_BOOTSTRAP_BYTES: usize = 32;
/// How long Alice waits for each of Bob's handshake messages.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything both ends of a link agree on, plus Alice's optics.
#[derive(Clone)]
pub struct LinkParams {
    /// Link ID (same at both ends; also the KMEs' link ID).
    pub link_id: String,
    /// The physical link (Alice's side uses it to simulate; Bob only for its rate).
    pub link: LinkConfig,
    /// Eavesdropper on the simulated channel.
    pub eve: Eve,
    /// Post-processing settings.
    pub proto: ProtocolConfig,
    /// Gates (pulses) per block.
    pub block_gates: u64,
    /// Blocks in flight at Bob.
    pub window: usize,
    /// Bootstrap authentication secret shared by the two nodes.
    pub bootstrap: Arc<Zeroizing<Vec<u8>>>,
    /// Fixed simulator seed (reproducible runs); random when `None`.
    pub seed: Option<u64>,
    /// Satellite links: the pass schedule (one block per pass); `None` for fibre.
    pub pass: Option<PassPlan>,
}

/// When a satellite link can make key: passes of a fixed loss profile that
/// repeat every `period_s` seconds of link time, the first starting at
/// `offset_s` (link time counts from the start of the session). Outside passes
/// Bob's telescope is not tracking and nothing is recorded.
#[derive(Debug, Clone)]
pub struct PassPlan {
    /// Seconds from one pass start to the next.
    pub period_s: f64,
    /// Start of the first pass.
    pub offset_s: f64,
    /// The pass as (seconds, channel transmittance) steps, rising to setting.
    pub steps: Vec<(f64, f64)>,
}

impl PassPlan {
    /// The pass of a satellite preset, sampled in 1 s steps.
    pub fn from_link(
        link: &LinkConfig,
        period_s: f64,
        offset_s: f64,
    ) -> Result<PassPlan, NetError> {
        let qkdnet_optics::device::Channel::Satellite(pass) = &link.channel else {
            return Err(NetError::Config(format!(
                "preset '{}' has no satellite channel",
                link.name
            )));
        };
        let steps: Vec<(f64, f64)> = pass
            .profile(1.0)
            .iter()
            .map(|pt| (1.0, 10f64.powf(-pt.loss_db / 10.0)))
            .collect();
        let plan = PassPlan {
            period_s,
            offset_s,
            steps,
        };
        if !(offset_s.is_finite() && offset_s >= 0.0) {
            return Err(NetError::Config(format!(
                "pass offset must be >= 0 s, got {offset_s}"
            )));
        }
        if !(period_s.is_finite() && period_s >= plan.duration_s()) {
            return Err(NetError::Config(format!(
                "pass period {period_s} s is shorter than the pass ({:.0} s)",
                plan.duration_s()
            )));
        }
        Ok(plan)
    }

    /// Length of one pass, seconds.
    pub fn duration_s(&self) -> f64 {
        self.steps.iter().map(|s| s.0).sum()
    }

    /// Start of the first pass at or after link time `t`.
    pub fn next_start(&self, t: f64) -> f64 {
        if t <= self.offset_s {
            self.offset_s
        } else {
            self.offset_s + ((t - self.offset_s) / self.period_s).ceil() * self.period_s
        }
    }
}

/// How fast Alice's simulator produces pulses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as the CPU allows (benchmarks, `link run`).
    Unpaced,
    /// Link time follows wall time × `scale` (a node: 1.0 is real time).
    RealTime {
        /// Link seconds per wall second.
        scale: f64,
    },
}

/// Live counters of one link, shared between its sessions and the metrics endpoint.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// 1 while a session is up.
    pub up: AtomicU64,
    /// Sessions started.
    pub sessions: AtomicU64,
    /// Gates simulated (Alice) or covered by received detection frames (Bob).
    pub gates: AtomicU64,
    /// Gates of the blocks that ended (distilled or aborted): the link time
    /// behind the secret bits, for rates that blocks in flight do not skew.
    pub gates_done: AtomicU64,
    /// Blocks distilled.
    pub blocks_ok: AtomicU64,
    /// Blocks aborted.
    pub blocks_aborted: AtomicU64,
    /// Sifted key bits that entered reconciliation.
    pub sifted_bits: AtomicU64,
    /// Secret key bits handed on (after the authentication refill).
    pub secret_bits: AtomicU64,
    /// Bits disclosed by reconciliation.
    pub leaked_bits: AtomicU64,
    /// LDPC frames that did not decode and were dropped at both ends.
    pub frames_dropped: AtomicU64,
    /// Errors corrected in the sifted key (QBER × sifted bits, summed over blocks).
    pub error_bits: AtomicU64,
    /// Authentication key bits spent (sum over sessions).
    pub auth_bits: AtomicU64,
    /// QBER of the last block with a measured QBER, as f64 bits.
    pub last_qber: AtomicU64,
    /// Last session error.
    pub last_error: Mutex<String>,
}

impl LinkStats {
    /// QBER over all blocks so far (0 before the first).
    pub fn mean_qber(&self) -> f64 {
        let n = self.sifted_bits.load(Ordering::Relaxed);
        if n == 0 {
            0.0
        } else {
            self.error_bits.load(Ordering::Relaxed) as f64 / n as f64
        }
    }

    /// QBER of the last block.
    pub fn qber(&self) -> f64 {
        f64::from_bits(self.last_qber.load(Ordering::Relaxed))
    }

    fn record(&self, e: &Event, block_gates: u64) {
        self.gates_done.fetch_add(block_gates, Ordering::Relaxed);
        let r: &BlockReport = match e {
            Event::Key {
                key,
                report,
                auth_refill_bits,
            } => {
                self.blocks_ok.fetch_add(1, Ordering::Relaxed);
                self.secret_bits.fetch_add(key.bits(), Ordering::Relaxed);
                let _ = auth_refill_bits;
                report
            }
            Event::Aborted { report, .. } => {
                self.blocks_aborted.fetch_add(1, Ordering::Relaxed);
                report
            }
        };
        self.sifted_bits.fetch_add(r.input_bits, Ordering::Relaxed);
        self.leaked_bits.fetch_add(r.leaked_bits, Ordering::Relaxed);
        self.frames_dropped
            .fetch_add(r.frames_discarded, Ordering::Relaxed);
        if r.qber.is_finite() {
            let errors = (r.qber * r.input_bits as f64).round() as u64;
            self.error_bits.fetch_add(errors, Ordering::Relaxed);
        }
        if r.input_bits > 0 && r.qber.is_finite() {
            self.last_qber.store(r.qber.to_bits(), Ordering::Relaxed);
        } else if r.disclosed_bits > 0 {
            let q = r.disclosed_errors as f64 / r.disclosed_bits as f64;
            self.last_qber.store(q.to_bits(), Ordering::Relaxed);
        }
    }

    /// A session is up: the link's current state has no error (the last one
    /// was history, and the logs keep it).
    fn session_up(&self) {
        self.set_error("");
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.up.store(1, Ordering::Relaxed);
    }

    fn set_error(&self, e: &str) {
        if let Ok(mut g) = self.last_error.lock() {
            e.clone_into(&mut g);
        }
    }
}

/// A stop signal that also unblocks sockets: streams registered with it are
/// shut down when it fires, and so are its children (one per session, so a
/// long-running link does not pile up sockets in its parent).
#[derive(Default)]
pub struct Stop {
    flag: AtomicBool,
    streams: Mutex<Vec<TcpStream>>,
    children: Mutex<Vec<std::sync::Weak<Stop>>>,
}

impl Stop {
    /// A new, unfired signal.
    pub fn new() -> Arc<Stop> {
        Arc::new(Stop::default())
    }
    /// A signal that fires when this one does (or on its own).
    pub fn child(&self) -> Arc<Stop> {
        let c = Stop::new();
        if let Ok(mut v) = self.children.lock() {
            v.retain(|w| w.strong_count() > 0);
            v.push(Arc::downgrade(&c));
        }
        if self.fired() {
            c.fire();
        }
        c
    }

    /// Fires: sets the flag and shuts down every registered stream.
    pub fn fire(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let children = self
            .children
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        for c in children.iter().filter_map(std::sync::Weak::upgrade) {
            c.fire();
        }
        if let Ok(mut v) = self.streams.lock() {
            for s in v.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
    /// Whether it fired.
    pub fn fired(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// Registers a stream to shut down on [`Stop::fire`] (at once if already fired).
    pub fn register(&self, s: &TcpStream) {
        if let Ok(c) = s.try_clone() {
            if let Ok(mut v) = self.streams.lock() {
                v.push(c);
            }
        }
        if self.fired() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
    /// Sleeps up to `d`, returning early (true) if fired.
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.fired() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
        }
        self.fired()
    }
}

/// A hello as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// 1 classical, 2 quantum.
    pub kind: u8,
    /// Session number.
    pub session: u64,
    /// Sender's nonce.
    pub nonce: [u8; 32],
    /// Link ID.
    pub link_id: String,
}

impl Hello {
    /// Whether this opens a classical connection.
    pub fn is_classical(&self) -> bool {
        self.kind == KIND_CLASSICAL
    }

    /// Encodes the hello.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.link_id.len());
        v.extend_from_slice(MAGIC);
        v.push(self.kind);
        v.extend_from_slice(&self.session.to_le_bytes());
        v.extend_from_slice(&self.nonce);
        let len = u16::try_from(self.link_id.len()).unwrap_or(u16::MAX);
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&self.link_id.as_bytes()[..usize::from(len)]);
        v
    }

    /// Decodes a hello from a reader, refusing anything malformed.
    pub fn read(r: &mut impl Read) -> Result<Hello, NetError> {
        let mut head = [0u8; 12 + 1 + 8 + 32 + 2];
        r.read_exact(&mut head)
            .map_err(|e| NetError::Peer(format!("link hello: {e}")))?;
        if head[..11] != MAGIC[..11] {
            return Err(NetError::Peer(
                "not a qkdnet link connection (bad hello magic)".into(),
            ));
        }
        if head[11] != MAGIC[11] {
            return Err(NetError::Peer(format!(
                "link hello: protocol version {}, this node speaks {} (upgrade both ends)",
                head[11], MAGIC[11]
            )));
        }
        let kind = head[12];
        if kind != KIND_CLASSICAL && kind != KIND_QUANTUM {
            return Err(NetError::Peer(format!("link hello: unknown kind {kind}")));
        }
        let session = u64::from_le_bytes(head[13..21].try_into().expect("8 bytes"));
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&head[21..53]);
        let len = usize::from(u16::from_le_bytes([head[53], head[54]]));
        if len == 0 || len > MAX_LINK_ID {
            return Err(NetError::Peer(format!(
                "link hello: link ID of {len} bytes"
            )));
        }
        let mut id = vec![0u8; len];
        r.read_exact(&mut id)
            .map_err(|e| NetError::Peer(format!("link hello: {e}")))?;
        let link_id = String::from_utf8(id)
            .map_err(|_| NetError::Peer("link hello: link ID is not UTF-8".into()))?;
        Ok(Hello {
            kind,
            session,
            nonce,
            link_id,
        })
    }
}

fn random_nonce() -> Result<[u8; 32], NetError> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(|e| NetError::Io(std::io::Error::other(e.to_string())))?;
    Ok(n)
}

fn random_u64() -> Result<u64, NetError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| NetError::Io(std::io::Error::other(e.to_string())))?;
    Ok(u64::from_le_bytes(b))
}

/// The link's handshake MAC key `K` (module docs), derived from the
/// bootstrap secret. Secret: zeroized on drop, never printed.
#[derive(Clone)]
struct HelloKey(Zeroizing<[u8; 32]>);

/// What the handshake's tags cover (`T` in the module docs).
#[derive(Clone)]
struct Transcript {
    link_id: String,
    session: u64,
    nonce_alice: [u8; 32],
    nonce_bob: [u8; 32],
}

impl HelloKey {
    fn derive(bootstrap: &[u8]) -> Result<HelloKey, NetError> {
        if bootstrap.len() < MIN_BOOTSTRAP_BYTES {
            return Err(NetError::Config(format!(
                "bootstrap secret shorter than {MIN_BOOTSTRAP_BYTES} bytes"
            )));
        }
        let mut k = Zeroizing::new([0u8; 32]);
        qkdnet_crypto::kdf::sm2_kdf_with_info(bootstrap, HELLO_KEY_INFO, &mut k[..])?;
        Ok(HelloKey(k))
    }

    fn mac(&self, label: &[u8], t: &Transcript) -> HmacSm3 {
        let mut m = HmacSm3::new(&self.0[..]);
        m.update(label);
        // Link IDs are at most MAX_LINK_ID bytes (the decoder's bound).
        m.update(&(t.link_id.len() as u32).to_be_bytes());
        m.update(t.link_id.as_bytes());
        m.update(&t.session.to_be_bytes());
        m.update(&t.nonce_alice);
        m.update(&t.nonce_bob);
        m
    }

    fn tag(&self, label: &[u8], t: &Transcript) -> [u8; PROOF_BYTES] {
        self.mac(label, t).finalize()
    }

    /// Whether `tag` is the tag of `label` over `t`, compared in constant time.
    fn verifies(&self, label: &[u8], t: &Transcript, tag: &[u8; PROOF_BYTES]) -> bool {
        self.mac(label, t).verify(tag).is_ok()
    }
}

/// Reads one handshake proof (a fixed [`PROOF_BYTES`] bytes).
pub fn read_proof(r: &mut impl Read) -> Result<[u8; PROOF_BYTES], NetError> {
    let mut p = [0u8; PROOF_BYTES];
    r.read_exact(&mut p)
        .map_err(|e| NetError::Peer(format!("link handshake proof: {e}")))?;
    Ok(p)
}

/// The session's initial authentication pads (see the module doc).
fn session_key(
    bootstrap: &[u8],
    link_id: &str,
    session: u64,
    nonce_alice: &[u8; 32],
    nonce_bob: &[u8; 32],
) -> Result<Zeroizing<Vec<u8>>, NetError> {
    let mut info = Vec::with_capacity(160);
    info.extend_from_slice(b"qkdnet/link/session-auth/v1");
    info.extend_from_slice(&(link_id.len() as u32).to_be_bytes());
    info.extend_from_slice(link_id.as_bytes());
    info.extend_from_slice(&session.to_be_bytes());
    info.extend_from_slice(nonce_alice);
    info.extend_from_slice(nonce_bob);
    let mut out = Zeroizing::new(vec![0u8; SESSION_AUTH_BYTES]);
    qkdnet_crypto::kdf::sm2_kdf_with_info(bootstrap, &info, &mut out)?;
    Ok(out)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Alice ran out of blocks to send (`max_blocks`) and every block finished.
    Finished,
    /// The stop signal fired.
    Stopped,
}

/// Alice's side of one session: connects to Bob's link port, simulates the
/// optics, streams Bob's detections over the emulated fibre and runs the
/// post-processing protocol, handing each finished block to `on_event`.
///
/// With `max_blocks` the session ends after that many blocks (a benchmark or
/// `link run`); otherwise it runs until `stop` fires or the connection fails.
pub fn alice_session(
    p: &LinkParams,
    peer: SocketAddr,
    pace: Pace,
    max_blocks: Option<u64>,
    stop: &Arc<Stop>,
    stats: &Arc<LinkStats>,
    on_event: &mut dyn FnMut(Event),
) -> Result<SessionEnd, NetError> {
    if p.bootstrap.len() < MIN_BOOTSTRAP_BYTES {
        return Err(NetError::Config(format!(
            "link {}: bootstrap secret shorter than {MIN_BOOTSTRAP_BYTES} bytes",
            p.link_id
        )));
    }
    let hello_key = HelloKey::derive(&p.bootstrap)?;
    let session = now_ms();
    let nonce = random_nonce()?;
    let hello = Hello {
        kind: KIND_CLASSICAL,
        session,
        nonce,
        link_id: p.link_id.clone(),
    };
    let mut classical = TcpStream::connect_timeout(&peer, Duration::from_secs(3))?;
    stop.register(&classical);
    classical.set_nodelay(true)?;
    classical.write_all(&hello.encode())?;
    classical.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let reply = Hello::read(&mut classical)?;
    if !reply.is_classical() || reply.link_id != p.link_id || reply.session != session {
        return Err(NetError::Peer(format!(
            "link {}: Bob answered for link '{}' session {}",
            p.link_id, reply.link_id, reply.session
        )));
    }
    let transcript = Transcript {
        link_id: p.link_id.clone(),
        session,
        nonce_alice: nonce,
        nonce_bob: reply.nonce,
    };
    classical.write_all(&hello_key.tag(LABEL_ALICE, &transcript))?;
    let bob_proof = read_proof(&mut classical)?;
    if !hello_key.verifies(LABEL_BOB, &transcript, &bob_proof) {
        return Err(NetError::Peer(format!(
            "link {}: Bob's handshake proof does not verify (not the peer holding this link's secret)",
            p.link_id
        )));
    }
    classical.set_read_timeout(None)?;
    let key = session_key(&p.bootstrap, &p.link_id, session, &nonce, &reply.nonce)?;

    let mut quantum = TcpStream::connect_timeout(&peer, Duration::from_secs(3))?;
    stop.register(&quantum);
    let mut quantum_hello = Hello {
        kind: KIND_QUANTUM,
        ..hello
    }
    .encode();
    quantum_hello.extend_from_slice(&hello_key.tag(LABEL_QUANTUM, &transcript));
    quantum.write_all(&quantum_hello)?;
    drop(hello_key);

    let seed = match p.seed {
        Some(s) => s,
        None => random_u64()?,
    };
    let mut sim = Simulator::new(&p.link, p.eve, seed)?;
    let rep = p.link.source.rep_rate_hz();
    let record = sim.alice_record(1 << 60)?;
    let mut ep = Endpoint::alice(p.proto.clone(), &key, seed ^ 0xA11CE, Some(record))?;
    drop(key);
    stats.session_up();

    // The optics run on their own thread; the emulated fibre's TCP buffer keeps
    // them at most a few blocks ahead of Bob.
    let block_gates = p.block_gates.max(1);
    let sim_stop = stop.clone();
    let sim_stats = stats.clone();
    let pass = p.pass.clone();
    let optics = std::thread::Builder::new()
        .name(format!("optics {}", p.link_id))
        .spawn(move || -> Result<(), NetError> {
            let start = Instant::now();
            let mut k = 0u64;
            let mut dets = Vec::new();
            let discard = &mut |_| Ok::<(), std::convert::Infallible>(());
            while max_blocks.is_none_or(|m| k < m) && k < BLOCKS_PER_SESSION {
                // The block: (gates, transmittance) steps from the next gate on.
                let steps: Vec<(u64, Option<f64>)> = match &pass {
                    None => vec![(block_gates, None)],
                    Some(plan) => {
                        let t = sim.next_gate() as f64 / rep;
                        let gap = ((plan.next_start(t) - t) * rep).round() as u64;
                        if gap > 0 {
                            // Between passes: nothing reaches Bob and nothing is recorded.
                            sim.set_channel_transmittance(0.0);
                            let r = sim.run(gap, discard);
                            if let Err(never) = r {
                                match never {}
                            }
                            sim_stats.gates.fetch_add(gap, Ordering::Relaxed);
                        }
                        plan.steps
                            .iter()
                            .map(|&(secs, eta)| (((secs * rep).round() as u64).max(1), Some(eta)))
                            .collect()
                    }
                };
                let first_gate = sim.next_gate();
                let gates: u64 = steps.iter().map(|s| s.0).sum();
                if let Pace::RealTime { scale } = pace {
                    let due = (first_gate + gates) as f64 / (rep * scale.max(1e-9));
                    let wait = due - start.elapsed().as_secs_f64();
                    if wait > 0.0 && sim_stop.sleep(Duration::from_secs_f64(wait)) {
                        break;
                    }
                }
                if sim_stop.fired() {
                    break;
                }
                dets.clear();
                for (n, eta) in steps {
                    if let Some(eta) = eta {
                        sim.set_channel_transmittance(eta);
                    }
                    if let Err(never) = sim.run(n, &mut |d| {
                        dets.push(d);
                        Ok::<(), std::convert::Infallible>(())
                    }) {
                        match never {}
                    }
                }
                let span = Span {
                    first_gate,
                    gates,
                    rep_rate_hz: rep,
                };
                quantum::write_frame(&mut quantum, session * BLOCKS_PER_SESSION + k, span, &dets)?;
                k += 1;
                sim_stats.gates.fetch_add(gates, Ordering::Relaxed);
            }
            let _ = quantum.shutdown(std::net::Shutdown::Write);
            Ok(())
        })?;

    let mut conn = Connection::new(classical)?;
    let result = drive_alice(&mut conn, &mut ep, &mut |e| {
        stats.record(&e, block_gates);
        on_event(e)
    });
    stats
        .auth_bits
        .fetch_add(ep.auth_key_bits_used(), Ordering::Relaxed);
    stats.up.store(0, Ordering::Relaxed);
    let stopped = stop.fired();
    drop(conn); // closes the classical channel, which also tells Bob
    let optics_result = optics
        .join()
        .map_err(|_| NetError::Internal("optics thread panicked".into()))?;
    match (result, stopped) {
        (_, true) => Ok(SessionEnd::Stopped),
        (Err(e), false) => {
            let e = NetError::from(e);
            stats.set_error(&e.to_string());
            Err(e)
        }
        (Ok(()), false) => {
            if let Err(e) = optics_result {
                stats.set_error(&e.to_string());
                return Err(e);
            }
            Ok(SessionEnd::Finished)
        }
    }
}

/// Bob's side of a classical handshake after his reply: the peer has proven
/// nothing yet, so nothing may change on its account.
pub struct BobHandshake {
    hello: Hello,
    nonce_bob: [u8; 32],
    key: HelloKey,
}

/// A classical connection whose peer proved knowledge of the link's
/// bootstrap secret ([`BobHandshake::read_alice_proof`] is the only way to
/// make one).
pub struct BobAuthenticated {
    transcript: Transcript,
    key: HelloKey,
}

/// Admits the quantum connection of one authenticated session: the hello must
/// name the session and carry its quantum tag.
#[derive(Clone)]
pub struct QuantumGate {
    transcript: Transcript,
    key: HelloKey,
}

/// A quantum connection that passed its session's [`QuantumGate`].
pub struct QuantumStream {
    stream: TcpStream,
    session: u64,
    nonce_bob: [u8; 32],
}

/// Bob's answer to Alice's classical hello: his own hello with a fresh nonce.
/// The hello must be a classical one for this link.
pub fn bob_reply(
    p: &LinkParams,
    classical: &mut impl Write,
    hello: Hello,
) -> Result<BobHandshake, NetError> {
    if !hello.is_classical() || hello.link_id != p.link_id {
        return Err(NetError::Peer(format!(
            "link {}: a classical handshake needs a classical hello for this link",
            p.link_id
        )));
    }
    let key = HelloKey::derive(&p.bootstrap)?;
    let nonce_bob = random_nonce()?;
    classical.write_all(
        &Hello {
            kind: KIND_CLASSICAL,
            session: hello.session,
            nonce: nonce_bob,
            link_id: p.link_id.clone(),
        }
        .encode(),
    )?;
    classical.flush()?;
    Ok(BobHandshake {
        hello,
        nonce_bob,
        key,
    })
}

impl BobHandshake {
    /// The peer's hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Reads Alice's proof and checks it in constant time.
    pub fn read_alice_proof(self, r: &mut impl Read) -> Result<BobAuthenticated, NetError> {
        let proof = read_proof(r)?;
        let transcript = Transcript {
            link_id: self.hello.link_id,
            session: self.hello.session,
            nonce_alice: self.hello.nonce,
            nonce_bob: self.nonce_bob,
        };
        if !self.key.verifies(LABEL_ALICE, &transcript, &proof) {
            return Err(NetError::Peer(format!(
                "link '{}': session handshake proof does not verify",
                transcript.link_id
            )));
        }
        Ok(BobAuthenticated {
            transcript,
            key: self.key,
        })
    }
}

impl BobAuthenticated {
    /// The link.
    pub fn link_id(&self) -> &str {
        &self.transcript.link_id
    }

    /// The session number.
    pub fn session(&self) -> u64 {
        self.transcript.session
    }

    /// Sends Bob's proof to Alice.
    pub fn send_proof(&self, w: &mut impl Write) -> Result<(), NetError> {
        w.write_all(&self.key.tag(LABEL_BOB, &self.transcript))?;
        w.flush()?;
        Ok(())
    }

    /// The check this session's quantum connection must pass.
    pub fn quantum_gate(&self) -> QuantumGate {
        QuantumGate {
            transcript: self.transcript.clone(),
            key: self.key.clone(),
        }
    }
}

impl QuantumGate {
    /// Admits `stream` if its hello names this session and `tag` is the
    /// session's quantum tag (compared in constant time).
    pub fn admit(
        &self,
        hello: &Hello,
        tag: &[u8; PROOF_BYTES],
        stream: TcpStream,
    ) -> Result<QuantumStream, NetError> {
        let t = &self.transcript;
        if hello.kind != KIND_QUANTUM
            || hello.link_id != t.link_id
            || hello.session != t.session
            || hello.nonce != t.nonce_alice
            || !self.key.verifies(LABEL_QUANTUM, t, tag)
        {
            return Err(NetError::Peer(format!(
                "link '{}': quantum connection does not authenticate for session {}",
                t.link_id, t.session
            )));
        }
        Ok(QuantumStream {
            stream,
            session: t.session,
            nonce_bob: t.nonce_bob,
        })
    }
}

/// Bob's side of one session, on a classical connection whose handshake
/// authenticated ([`BobHandshake::read_alice_proof`]) and the session's
/// quantum connection ([`QuantumGate::admit`]). Runs until Alice closes the
/// emulated fibre and every block has ended, or the stop signal fires.
pub fn bob_session(
    p: &LinkParams,
    auth: BobAuthenticated,
    classical: TcpStream,
    quantum: QuantumStream,
    stop: &Arc<Stop>,
    stats: &Arc<LinkStats>,
    on_event: &mut dyn FnMut(Event),
) -> Result<SessionEnd, NetError> {
    let t = &auth.transcript;
    if quantum.session != t.session || quantum.nonce_bob != t.nonce_bob || t.link_id != p.link_id {
        return Err(NetError::Usage(
            "bob_session: the quantum connection is not this session's".into(),
        ));
    }
    let quantum = quantum.stream;
    let block_gates = p.block_gates.max(1);
    stop.register(&classical);
    stop.register(&quantum);
    let key = session_key(
        &p.bootstrap,
        &p.link_id,
        t.session,
        &t.nonce_alice,
        &t.nonce_bob,
    )?;
    let seed = match p.seed {
        Some(s) => s.rotate_left(17) ^ 0xB0B,
        None => random_u64()?,
    };
    let mut ep = Endpoint::bob(p.proto.clone(), &key, seed)?;
    drop(key);
    stats.session_up();
    let session = t.session;
    drop(auth);
    // The emulated fibre is read on its own thread, so Bob keeps serving the
    // blocks in flight while the next block's detections are on their way.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<quantum::QuantumFrame, NetError>>(2);
    let fibre_stats = stats.clone();
    let quantum_ctl = quantum.try_clone()?;
    let reader = std::thread::Builder::new()
        .name(format!("fibre {}", p.link_id))
        .spawn(move || {
            let mut fibre = std::io::BufReader::with_capacity(1 << 20, quantum);
            loop {
                let item = match quantum::read_frame(&mut fibre) {
                    Ok(Some(f)) if f.block / BLOCKS_PER_SESSION != session => {
                        Err(NetError::Peer(format!(
                            "quantum channel: block {} is not of session {session}",
                            f.block
                        )))
                    }
                    Ok(Some(f)) => {
                        fibre_stats.gates.fetch_add(f.span.gates, Ordering::Relaxed);
                        Ok(f)
                    }
                    Ok(None) => return,
                    Err(e) => Err(e),
                };
                let last = item.is_err();
                if tx.send(item).is_err() || last {
                    return;
                }
            }
        })?;
    let mut fibre_error = None;
    let mut blocks = || match rx.try_recv() {
        Ok(Ok(f)) => Feed::Block(f.block, BlockInput::Record(f.detections)),
        Ok(Err(e)) => {
            fibre_error = Some(e);
            Feed::End
        }
        Err(std::sync::mpsc::TryRecvError::Empty) => Feed::NotYet,
        Err(std::sync::mpsc::TryRecvError::Disconnected) => Feed::End,
    };
    let mut conn = Connection::new(classical)?;
    let result = drive_bob_live(&mut conn, &mut ep, &mut blocks, p.window, &mut |e| {
        stats.record(&e, block_gates);
        on_event(e)
    });
    drop(conn);
    drop(rx);
    let _ = quantum_ctl.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    stats
        .auth_bits
        .fetch_add(ep.auth_key_bits_used(), Ordering::Relaxed);
    stats.up.store(0, Ordering::Relaxed);
    if stop.fired() {
        return Ok(SessionEnd::Stopped);
    }
    let outcome = match (result, fibre_error) {
        (Err(e), _) => Err(NetError::from(e)),
        (Ok(()), Some(e)) => Err(e),
        (Ok(()), None) => Ok(SessionEnd::Finished),
    };
    if let Err(e) = &outcome {
        stats.set_error(&e.to_string());
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(secret: u8) -> LinkParams {
        let link = qkdnet_optics::preset::get("metro-1ghz").expect("preset");
        LinkParams {
            link_id: "core-north".into(),
            link,
            eve: Eve::parse("none").expect("eve"),
            proto: ProtocolConfig::default(),
            block_gates: 1,
            window: 1,
            bootstrap: Arc::new(Zeroizing::new(vec![secret; 256])),
            seed: Some(1),
            pass: None,
        }
    }

    fn alice_hello(session: u64) -> Hello {
        Hello {
            kind: KIND_CLASSICAL,
            session,
            nonce: [0xA1; 32],
            link_id: "core-north".into(),
        }
    }

    /// Bob's reply to `hello`, and the transcript both proofs cover.
    fn handshake(p: &LinkParams, hello: Hello) -> (BobHandshake, Transcript) {
        let mut wire = Vec::new();
        let hs = bob_reply(p, &mut wire, hello.clone()).expect("reply");
        let reply = Hello::read(&mut &wire[..]).expect("Bob's reply parses");
        assert_eq!(reply.session, hello.session);
        assert_eq!(reply.link_id, hello.link_id);
        let t = Transcript {
            link_id: hello.link_id,
            session: hello.session,
            nonce_alice: hello.nonce,
            nonce_bob: reply.nonce,
        };
        (hs, t)
    }

    fn loopback() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (a, b)
    }

    #[test]
    fn alice_proof_authenticates_and_bob_proves_himself() {
        let p = params(7);
        let (hs, t) = handshake(&p, alice_hello(42));
        let k = HelloKey::derive(&p.bootstrap).expect("key");
        let auth = hs
            .read_alice_proof(&mut &k.tag(LABEL_ALICE, &t)[..])
            .expect("Alice's proof verifies");
        assert_eq!((auth.link_id(), auth.session()), ("core-north", 42));
        let mut bob_proof = Vec::new();
        auth.send_proof(&mut bob_proof).expect("send");
        let bob_proof: [u8; PROOF_BYTES] = bob_proof.try_into().expect("one proof");
        assert!(k.verifies(LABEL_BOB, &t, &bob_proof));
        assert!(!k.verifies(LABEL_ALICE, &t, &bob_proof));
    }

    #[test]
    fn wrong_secret_reflected_or_replayed_proofs_are_refused() {
        let p = params(7);
        let k = HelloKey::derive(&p.bootstrap).expect("key");
        let wrong = HelloKey::derive(&params(8).bootstrap).expect("key");
        // A proof under another secret.
        let (hs, t) = handshake(&p, alice_hello(42));
        assert!(
            hs.read_alice_proof(&mut &wrong.tag(LABEL_ALICE, &t)[..])
                .is_err()
        );
        // Bob's own proof reflected back as Alice's.
        let (hs, t) = handshake(&p, alice_hello(42));
        assert!(hs.read_alice_proof(&mut &k.tag(LABEL_BOB, &t)[..]).is_err());
        // A proof recorded from an earlier handshake: Bob's nonce is fresh.
        let (_, old) = handshake(&p, alice_hello(42));
        let (hs, _) = handshake(&p, alice_hello(42));
        assert!(
            hs.read_alice_proof(&mut &k.tag(LABEL_ALICE, &old)[..])
                .is_err()
        );
        // A proof cut short.
        let (hs, t) = handshake(&p, alice_hello(42));
        assert!(
            hs.read_alice_proof(&mut &k.tag(LABEL_ALICE, &t)[..31])
                .is_err()
        );
    }

    #[test]
    fn bob_answers_only_classical_hellos_for_his_link() {
        let p = params(7);
        let mut other = alice_hello(1);
        other.link_id = "core-south".into();
        assert!(bob_reply(&p, &mut Vec::new(), other).is_err());
        let mut quantum = alice_hello(1);
        quantum.kind = KIND_QUANTUM;
        assert!(bob_reply(&p, &mut Vec::new(), quantum).is_err());
    }

    #[test]
    fn the_quantum_connection_needs_its_sessions_tag() {
        let p = params(7);
        let k = HelloKey::derive(&p.bootstrap).expect("key");
        let (hs, t) = handshake(&p, alice_hello(42));
        let auth = hs
            .read_alice_proof(&mut &k.tag(LABEL_ALICE, &t)[..])
            .expect("auth");
        let gate = auth.quantum_gate();
        let q = Hello {
            kind: KIND_QUANTUM,
            ..alice_hello(42)
        };
        let (_keep, s) = loopback();
        // Alice's classical proof is not a quantum tag.
        assert!(gate.admit(&q, &k.tag(LABEL_ALICE, &t), s).is_err());
        let (_keep, s) = loopback();
        // Another session's hello with this session's tag.
        let other = Hello {
            session: 43,
            ..q.clone()
        };
        assert!(gate.admit(&other, &k.tag(LABEL_QUANTUM, &t), s).is_err());
        let (_keep, s) = loopback();
        // A classical hello.
        assert!(
            gate.admit(&alice_hello(42), &k.tag(LABEL_QUANTUM, &t), s)
                .is_err()
        );
        let (_keep, s) = loopback();
        assert!(gate.admit(&q, &k.tag(LABEL_QUANTUM, &t), s).is_ok());
    }

    #[test]
    fn a_hello_of_another_protocol_version_says_so() {
        let mut wire = alice_hello(1).encode();
        assert!(Hello::read(&mut &wire[..]).is_ok());
        wire[11] = 1;
        match Hello::read(&mut &wire[..]) {
            Err(NetError::Peer(m)) => assert!(m.contains("protocol version 1"), "{m}"),
            r => panic!("expected a version error, got {r:?}"),
        }
        wire[0] = b'X';
        assert!(Hello::read(&mut &wire[..]).is_err());
    }
}
