//! The call edge: the softphone's outbound SIP proxy and RTP relay.
//!
//! One UDP socket carries SIP from the local softphone and from other edges.
//! The edge is a record-routing proxy (RFC 3261 §16) that keeps a little
//! state per call:
//!
//! - an **INVITE from its softphone** (no To tag) gets `100 Trying` at once;
//!   the edge opens a session at the key service naming the callee
//!   (`sip:USER@DOMAIN`, USER from the Request-URI), spending two keys of its
//!   medium; it points the SDP at its own relay (no `a=crypto` line leaves),
//!   adds `X-QKD-Session` (the session ID only) and `X-QKD-Mode`, and sends
//!   the INVITE to the edge the Request-URI names. If the key service cannot
//!   give a key, the softphone gets `503` with a `Warning` saying why — never a
//!   call in the clear;
//! - an **INVITE from another edge** must carry those headers (else `488`);
//!   the edge joins the session with its own medium (the service checks that
//!   its owner is the callee), checks that the key's other party is the From
//!   identity, points the SDP at its relay and retargets the INVITE to its
//!   softphone;
//! - responses follow the Via chain back; an answer's SDP is pointed at the
//!   relay the same way; in-dialog requests (ACK, BYE, re-INVITE) follow the
//!   Route set the two Record-Route headers built;
//! - a BYE, or a final failure of the INVITE, ends the call: the relay stops
//!   and the call's report (mode, key source, packets, drops) is written.
//!
//! The relay (mode `sm4`, [`crate::media`]) takes plain RTP/RTCP from the
//! softphone on loopback and sends it SM4-GCM-protected to the far edge, and
//! the reverse.
//!
//! In mode `otp` ([`crate::otp`]) both edges are also SAEs of the QKD network
//! ([`KmeLink`]). The caller's INVITE names its SAE (`X-QKD-SAE`); the callee's
//! edge takes the first pad segment of its sending direction from its KME
//! before the phone rings (else `503`) and names its own SAE in its answers;
//! the caller's edge takes its first segment when the first answer arrives
//! (else the softphone gets `503`). From then on each edge refills its
//! sending pad from its KME and announces the key IDs on the media path; the
//! far edge fetches them by ID. The key-service session is still opened (it
//! checks who is calling whom and names the call); its key only authenticates
//! the pad announcements — the media are under the pad alone.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qkdnet_etsi::client::EtsiClient;
use qkdnet_media::Medium;
use qkdnet_media::proto::{Identity, KeySource, SESSION_ID_LEN};
use qkdnet_terminal::client::{Connection, Terminal};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::media::{Counters, Direction, Drop as Discard, Protect, Unprotect, is_rtcp};
use crate::message;
use crate::otp::{self, AnnounceKey, OtpRecv, OtpSend};
use crate::rekey::{self, Control, ControlKey, Kind};
use crate::sdp;
use crate::sip::{self, Message, StartLine, Uri, Via};
use crate::srtp;
use hex::encode as hex;

/// Header carrying the session ID between edges.
pub const SESSION_HEADER: &str = "X-QKD-Session";
/// Header carrying a sealed message's own Content-Type between edges.
pub const CONTENT_TYPE_HEADER: &str = "X-QKD-Content-Type";
/// Header carrying the media mode between edges.
pub const MODE_HEADER: &str = "X-QKD-Mode";
/// Header carrying an edge's SAE ID between edges (`otp` mode).
pub const SAE_HEADER: &str = "X-QKD-SAE";

/// How the media of a call is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The softphones' own SRTP (SDES); each decrypts with a quantum-derived
    /// key the edge wrote into its SDP, and the edge re-protects what its
    /// softphone sends under the quantum-derived key of that direction.
    Srtp,
    /// SM4-GCM between the edges (national algorithms); plain RTP on loopback.
    Sm4,
    /// One-time pad of QKD keys from the edges' KMEs with a Wegman–Carter MAC
    /// between the edges; plain RTP on loopback.
    Otp,
}

impl Mode {
    /// The mode's name on the wire and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Srtp => "srtp",
            Self::Sm4 => "sm4",
            Self::Otp => "otp",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "srtp" => Some(Self::Srtp),
            "sm4" => Some(Self::Sm4),
            "otp" => Some(Self::Otp),
            _ => None,
        }
    }
}

/// What an edge needs to know.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// SIP (UDP) for the softphone and for other edges.
    pub listen: SocketAddr,
    /// The softphone's SIP address: requests from it are outgoing calls.
    pub ua: SocketAddr,
    /// The domain of subscribers' identities (`sip:USER@DOMAIN`).
    pub domain: String,
    /// The key service (`host:port`).
    pub keyservice: String,
    /// Media mode of the calls this edge places.
    pub mode: Mode,
    /// Where the relay listens for the far edge (its address on the network).
    pub media_ip: IpAddr,
    /// Where the relay listens for the softphone (loopback).
    pub local_ip: IpAddr,
    /// The registrar/proxy (e.g. kamailio) for requests whose Request-URI
    /// names a domain rather than an address: REGISTER (with a Path header
    /// naming this edge, RFC 3327, so calls to the subscriber come through
    /// it), and calls and messages to `sip:user@DOMAIN`.
    pub registrar: Option<SocketAddr>,
    /// This edge as an SAE of the QKD network (`otp` mode needs it).
    pub kme: Option<KmeLink>,
    /// `sm4`: the calls this edge places move to a new session key this
    /// often (`None`: never).
    pub rekey: Option<Duration>,
}

/// An edge's KME, for `otp` pad.
#[derive(Debug, Clone)]
pub struct KmeLink {
    /// ETSI GS QKD 014 client of this edge's SAE.
    pub client: Arc<EtsiClient>,
    /// This edge's SAE ID.
    pub sae: String,
    /// Keys per `enc_keys` request (one pad segment).
    pub keys_per_fetch: u64,
    /// Size of each key, bits (a multiple of 8, at most 8192).
    pub key_bits: u64,
}

/// One finished call, as the edge reports it (one JSON line on stdout).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallReport {
    /// SIP Call-ID.
    pub call_id: String,
    /// `caller` or `callee`.
    pub role: &'static str,
    /// Media mode.
    pub mode: &'static str,
    /// The key-service session (hex).
    pub session: String,
    /// `qkd` or `csprng`: where the service got the session key.
    pub key_source: &'static str,
    /// The other party, as the key service named it.
    pub peer: String,
    /// Seconds the relay ran.
    pub seconds: f64,
    /// Packets protected and sent to the far edge.
    pub sent: u64,
    /// Packets from the far edge that verified and went to the softphone.
    pub received: u64,
    /// Dropped: failed authentication (tampered, wrong key).
    pub dropped_auth: u64,
    /// Dropped: replayed or too old.
    pub dropped_replay: u64,
    /// Dropped: malformed or beyond the SSRC limit.
    pub dropped_other: u64,
    /// Medium keys spent on this call's key (the request's two).
    pub medium_keys: u64,
    /// Milliseconds the key step took at this edge (connect to the key
    /// service, challenge, request, grant; the INVITE waits that long here).
    pub key_ms: f64,
    /// `otp`: QKD keys this edge took from its KME (its sending pad and the
    /// far edge's, fetched by ID).
    pub pad_keys: u64,
    /// `otp`: bytes of those keys.
    pub pad_bytes: u64,
    /// `otp`: bytes of this edge's sending pad spent (hash key, tag masks,
    /// payloads, segment ends skipped).
    pub pad_used_bytes: u64,
    /// `otp`: packets dropped for want of pad (sending or receiving).
    pub dropped_no_pad: u64,
    /// `otp`: talk time the KME's stock for this pair of SAEs still gives, at
    /// G.711's 8,800 bytes of pad a second each way (from its last status).
    pub talk_seconds_left: Option<f64>,
    /// `sm4`: times the call moved to a new session key.
    pub rekeys: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Caller,
    Callee,
}

struct Call {
    role: Role,
    mode: Mode,
    /// `srtp`: the quantum-derived key the softphone decrypts with, and the
    /// crypto tag of its offer.
    ua_rx_key: Option<srtp::MasterKey>,
    crypto_tag: u32,
    /// `srtp`: the softphone's own sending key (from its SDP).
    ua_key: watch::Sender<Option<srtp::MasterKey>>,
    session: [u8; SESSION_ID_LEN],
    source: KeySource,
    peer: String,
    /// The relay's addresses: toward the softphone, toward the far edge.
    ua_leg: SocketAddr,
    wire_leg: SocketAddr,
    /// Where the softphone and the far edge receive RTP (RTCP: +1).
    ua_rtp: watch::Sender<Option<SocketAddr>>,
    far_rtp: watch::Sender<Option<SocketAddr>>,
    /// Stops the relay thread (dropped: stopped too).
    relay: watch::Sender<bool>,
    stats: Arc<Mutex<RelayStats>>,
    started: Instant,
    key_ms: f64,
    /// `otp`: the far edge's SAE and the pad's way into the relay.
    otp: Option<OtpHandle>,
}

struct OtpHandle {
    peer_sae: watch::Sender<Option<String>>,
    pad: mpsc::UnboundedSender<PadEvent>,
    /// The caller's first segment is taken (at the first answer).
    started: bool,
    /// The call's session key: binds the SAE IDs the edges exchange in SIP.
    key: qkdnet_media::Key256,
}

/// `X-QKD-SAE` value: the SAE ID and a MAC under the call's session key (the
/// direction of the message), so no one on the SIP path can name another
/// SAE — which would make the KME hand *them* this call's pad.
fn sae_header(key: &qkdnet_media::Key256, dir: Direction, sae: &str) -> String {
    let tag =
        crate::media::ControlMac::derive(key, b"qkdnet call otp sae v1", dir).tag(sae.as_bytes());
    format!("{sae};mac={}", hex(&tag))
}

/// The SAE ID of an `X-QKD-SAE` value whose MAC verifies under `key`.
fn checked_sae(key: &qkdnet_media::Key256, dir: Direction, value: &str) -> Option<String> {
    let (sae, mac) = value.trim().split_once(";mac=")?;
    let tag = hex::decode(mac).ok()?;
    let ok = crate::media::ControlMac::derive(key, b"qkdnet call otp sae v1", dir)
        .verify(sae.as_bytes(), &tag);
    (ok && qkdnet_etsi::ids::SaeId::new(sae).is_ok()).then(|| sae.to_owned())
}

/// Keys from the KME, concatenated: a pad segment.
struct Fetched {
    pad: Zeroizing<Vec<u8>>,
    ids: Vec<Uuid>,
    key_bytes: u16,
    request: Uuid,
    /// The KME's stock for the pair, bits, if its status answered.
    stock_bits: Option<u64>,
}

enum PadEvent {
    Out(Result<Fetched, String>),
    /// Segment start, number of keys, the keys.
    In(u64, u64, Result<Zeroizing<Vec<u8>>, String>),
}

/// Takes one sending segment for the SAE `peer` from the KME (idempotent
/// request, retried), and the KME's remaining stock for the pair.
async fn fetch_out(kme: &KmeLink, peer: &str) -> Result<Fetched, String> {
    let request = Uuid::new_v4();
    // The stock (for the report's talk time left) is asked at the same time.
    let (keys, status) = tokio::join!(
        kme.client
            .enc_keys_idempotent(peer, kme.keys_per_fetch, Some(kme.key_bits), request, 3),
        kme.client.status(peer)
    );
    let keys = keys.map_err(|e| format!("KME {}: {e}", kme.client.kme_url()))?;
    let key_bytes = u16::try_from(kme.key_bits / 8)
        .ok()
        .filter(|b| usize::from(*b) <= otp::MAX_KEY_BYTES)
        .ok_or("key size above 8192 bits")?;
    let mut pad = Zeroizing::new(Vec::with_capacity(keys.len() * usize::from(key_bytes)));
    let mut ids = Vec::with_capacity(keys.len());
    for k in &keys {
        if k.material.len() != usize::from(key_bytes) {
            return Err(format!("KME gave a key of {} bytes", k.material.len()));
        }
        pad.extend_from_slice(&k.material);
        ids.push(k.id);
    }
    let stock_bits = status
        .ok()
        .map(|s| s.stored_key_count * u64::from(s.key_size));
    Ok(Fetched {
        pad,
        ids,
        key_bytes,
        request,
        stock_bits,
    })
}

/// Takes the keys of an announced segment of the far edge's pad by ID.
async fn fetch_in(kme: &KmeLink, peer: &str, ids: &[Uuid]) -> Result<Zeroizing<Vec<u8>>, String> {
    let keys = kme
        .client
        .dec_keys(peer, ids)
        .await
        .map_err(|e| format!("KME {}: {e}", kme.client.kme_url()))?;
    let mut pad = Zeroizing::new(Vec::new());
    for k in &keys {
        pad.extend_from_slice(&k.material);
    }
    Ok(pad)
}

#[derive(Debug, Default, Clone, Copy)]
struct RelayStats {
    sent: u64,
    received: u64,
    auth: u64,
    replay: u64,
    other: u64,
    no_pad: u64,
    pad_keys: u64,
    pad_bytes: u64,
    pad_used: u64,
    stock_bits: Option<u64>,
    rekeys: u64,
}

enum Ask {
    Open(Identity, [u8; SESSION_ID_LEN]),
    Join([u8; SESSION_ID_LEN]),
}

struct State {
    calls: HashMap<String, Call>,
    /// Requests whose key step is running (Call-ID, or Call-ID|CSeq for a
    /// MESSAGE): their retransmissions are absorbed.
    pending: HashSet<String>,
    /// Requests this edge sent on, by the branch of its Via: where their
    /// responses go (the hop the request came from). A response for a branch
    /// not here is dropped, so no one can make the edge send a "response"
    /// to an address of their choosing.
    sent: HashMap<String, (SocketAddr, Instant)>,
}

/// How long the edge routes responses to a request it sent on (64 × T1).
const TRANSACTION_LIFE: Duration = Duration::from_secs(32);
/// A call whose relay saw no packet for this long is ended (the BYE was
/// lost, a softphone died); RTCP alone keeps a held call alive.
pub const MEDIA_IDLE: Duration = Duration::from_secs(120);

/// A running edge.
pub struct Edge {
    cfg: EdgeConfig,
    sock: UdpSocket,
    medium: tokio::sync::Mutex<Box<dyn Medium + Send>>,
    state: Mutex<State>,
    reports: Mutex<Vec<CallReport>>,
    on_report: Box<dyn Fn(&CallReport) + Send + Sync>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn unhex(s: &str) -> Option<[u8; SESSION_ID_LEN]> {
    let mut out = [0u8; SESSION_ID_LEN];
    hex::decode_to_slice(s.trim(), &mut out).ok()?;
    Some(out)
}

/// Binds an even RTP port and the RTCP port after it on `ip`.
async fn bind_pair(ip: IpAddr) -> std::io::Result<(UdpSocket, UdpSocket)> {
    for _ in 0..64 {
        let rtp = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let port = rtp.local_addr()?.port();
        if port % 2 != 0 || port == u16::MAX {
            continue;
        }
        if let Ok(rtcp) = UdpSocket::bind(SocketAddr::new(ip, port + 1)).await {
            return Ok((rtp, rtcp));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free even/odd port pair for RTP/RTCP",
    ))
}

fn plus_one(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip(), a.port().wrapping_add(1))
}

impl Edge {
    /// Binds the SIP socket. `on_report` is called with each finished call.
    pub async fn bind(
        cfg: EdgeConfig,
        medium: Box<dyn Medium + Send>,
        on_report: Box<dyn Fn(&CallReport) + Send + Sync>,
    ) -> std::io::Result<Arc<Self>> {
        let sock = UdpSocket::bind(cfg.listen).await?;
        let mut cfg = cfg;
        cfg.listen = sock.local_addr()?;
        Ok(Arc::new(Self {
            cfg,
            sock,
            medium: tokio::sync::Mutex::new(medium),
            state: Mutex::new(State {
                calls: HashMap::new(),
                pending: HashSet::new(),
                sent: HashMap::new(),
            }),
            reports: Mutex::new(Vec::new()),
            on_report,
        }))
    }

    /// The SIP address the edge listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.cfg.listen
    }

    /// Reports of the calls finished so far.
    pub fn reports(&self) -> Vec<CallReport> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Serves until the socket fails.
    pub async fn run(self: Arc<Self>) -> std::io::Result<()> {
        let mut buf = vec![0u8; sip::MAX_MESSAGE + 1];
        loop {
            let (n, src) = self.sock.recv_from(&mut buf).await?;
            let bytes = &buf[..n];
            if bytes.iter().all(|b| b.is_ascii_whitespace()) {
                continue; // keep-alive
            }
            match sip::parse(bytes) {
                Ok(msg) => {
                    // Requests that wait for the key service run beside the
                    // loop; everything else in arrival order (a 180 must not
                    // overtake the 200 of the same INVITE).
                    let keyed = matches!(&msg.start, StartLine::Request { method, .. }
                        if (method == "INVITE"
                            && msg.header("To").is_some_and(|t| sip::header_param(t, "tag").is_none()))
                            || (method == "MESSAGE" && !msg.body.is_empty()));
                    if keyed {
                        tokio::spawn(self.clone().handle(msg, src));
                    } else {
                        self.clone().handle(msg, src).await;
                    }
                }
                Err(e) => tracing::warn!(%src, "dropped a datagram that is not SIP: {e}"),
            }
        }
    }

    async fn send(&self, msg: &Message, to: SocketAddr) {
        if let Err(e) = self.sock.send_to(&msg.encode(), to).await {
            tracing::warn!(%to, "SIP send failed: {e}");
        }
    }

    fn my_uri(&self) -> String {
        format!("sip:{}", self.cfg.listen)
    }

    fn is_me(&self, uri: &str) -> bool {
        Uri::parse(uri).and_then(|u| u.socket_addr()) == Some(self.cfg.listen)
    }

    /// Answers `req` (from `src`) with a failure and a reason the user sees.
    async fn refuse(&self, req: &Message, src: SocketAddr, code: u16, reason: &str, why: &str) {
        let mut r = req.response(code, reason, "qkdnet-edge");
        r.headers.push((
            "Warning".into(),
            format!("399 qkdnet-edge \"{}\"", why.replace('"', "'")),
        ));
        tracing::warn!(code, "refused: {why}");
        self.send_response(r, src).await;
    }

    async fn send_response(&self, r: Message, fallback: SocketAddr) {
        let to = r
            .top_via()
            .and_then(|v| v.response_target())
            .unwrap_or(fallback);
        self.send(&r, to).await;
    }

    async fn handle(self: Arc<Self>, mut msg: Message, src: SocketAddr) {
        match msg.start.clone() {
            StartLine::Response { .. } => self.response(msg).await,
            StartLine::Request { method, .. } => {
                // Mark where the request came from (RFC 3581) for the way back.
                if let Some(mut via) = msg.top_via() {
                    via.set_param("received", Some(src.ip().to_string()));
                    via.set_param("rport", Some(src.port().to_string()));
                    msg.pop_front("Via");
                    msg.push_front("Via", &via.to_string());
                } else {
                    return;
                }
                let mf = msg
                    .header("Max-Forwards")
                    .and_then(|v| v.trim().parse::<u32>().ok())
                    .unwrap_or(70);
                if mf == 0 {
                    self.refuse(&msg, src, 483, "Too Many Hops", "Max-Forwards reached 0")
                        .await;
                    return;
                }
                msg.set("Max-Forwards", &(mf - 1).to_string());
                let initial = msg
                    .header("To")
                    .is_some_and(|t| sip::header_param(t, "tag").is_none());
                if method == "INVITE" && initial {
                    let call_id = msg.call_id().unwrap_or_default().to_owned();
                    // Check and mark in one lock: two copies of one INVITE
                    // handled side by side start one key step, not two.
                    let busy = {
                        let Ok(mut st) = self.state.lock() else {
                            return;
                        };
                        let busy = st.pending.contains(&call_id) || st.calls.contains_key(&call_id);
                        if !busy {
                            st.pending.insert(call_id.clone());
                        }
                        busy
                    };
                    let trying = msg.response(100, "Trying", "");
                    self.send_response(trying, src).await;
                    if busy {
                        return; // a retransmission
                    }
                    let from_ua = src == self.cfg.ua;
                    let r = if from_ua {
                        self.outgoing_invite(msg.clone(), src).await
                    } else {
                        self.incoming_invite(msg.clone(), src).await
                    };
                    if let Ok(mut st) = self.state.lock() {
                        st.pending.remove(&call_id);
                    }
                    if let Err((code, reason, why)) = r {
                        self.refuse(&msg, src, code, reason, &why).await;
                    }
                    return;
                }
                if method == "REGISTER" && src == self.cfg.ua {
                    // The subscriber's calls must come through this edge.
                    msg.push_front("Path", &format!("<{};lr>", self.my_uri()));
                    self.forward_request(msg, src, &method).await;
                    return;
                }
                if method == "MESSAGE" && !msg.body.is_empty() {
                    let id = format!(
                        "{}|{}",
                        msg.call_id().unwrap_or_default(),
                        msg.header("CSeq").unwrap_or_default()
                    );
                    {
                        let Ok(mut st) = self.state.lock() else {
                            return;
                        };
                        if st.pending.contains(&id) {
                            return; // a retransmission; the first copy is on its way
                        }
                        st.pending.insert(id.clone());
                    }
                    let r = if src == self.cfg.ua {
                        self.outgoing_message(msg.clone(), src).await
                    } else {
                        self.incoming_message(msg.clone(), src).await
                    };
                    if let Ok(mut st) = self.state.lock() {
                        st.pending.remove(&id);
                    }
                    if let Err((code, reason, why)) = r {
                        self.refuse(&msg, src, code, reason, &why).await;
                    }
                    return;
                }
                self.forward_request(msg, src, &method).await;
            }
        }
    }

    /// A MESSAGE from the softphone: sealed under a fresh session with the
    /// recipient, sent on with only the session ID in the clear.
    async fn outgoing_message(
        self: &Arc<Self>,
        mut msg: Message,
        src: SocketAddr,
    ) -> Result<(), (u16, &'static str, String)> {
        let Some(to) = self.next_hop(&mut msg, src) else {
            return Err((
                404,
                "Not Found",
                "the recipient's edge is not an address".into(),
            ));
        };
        let user = msg
            .header("To")
            .and_then(Uri::parse)
            .map(|u| u.user)
            .unwrap_or_default();
        let recipient = Identity::new(format!("sip:{user}@{}", self.cfg.domain))
            .map_err(|e| (404, "Not Found", format!("recipient: {e}")))?;
        let mut sid = [0u8; SESSION_ID_LEN];
        getrandom::fill(&mut sid).map_err(|e| (500, "Server Internal Error", e.to_string()))?;
        let key = self.key_step(Ask::Open(recipient, sid)).await?;
        let call_id = msg.call_id().unwrap_or_default().to_owned();
        let cseq = msg.header("CSeq").unwrap_or_default().to_owned();
        msg.body = message::seal(&key.key, &call_id, &cseq, &msg.body)
            .map_err(|e| (413, "Request Entity Too Large", e.to_string()))?;
        let ctype = msg
            .header("Content-Type")
            .unwrap_or("text/plain")
            .to_owned();
        msg.set(CONTENT_TYPE_HEADER, &ctype);
        msg.set("Content-Type", message::SEALED_TYPE);
        msg.set(SESSION_HEADER, &hex(&sid));
        self.add_via(&mut msg);
        tracing::info!(
            peer = key.peer.as_str(),
            "message sealed with a quantum session key"
        );
        self.send(&msg, to).await;
        Ok(())
    }

    /// A sealed MESSAGE from another edge: joined, checked, opened, passed on.
    async fn incoming_message(
        self: &Arc<Self>,
        mut msg: Message,
        src: SocketAddr,
    ) -> Result<(), (u16, &'static str, String)> {
        let sid = msg
            .header(SESSION_HEADER)
            .and_then(unhex)
            .filter(|_| msg.header("Content-Type") == Some(message::SEALED_TYPE))
            .ok_or((
                488,
                "Not Acceptable Here",
                "not a quantum-sealed message".to_string(),
            ))?;
        let key = self.join_from(&msg, sid, "message").await?;
        let call_id = msg.call_id().unwrap_or_default().to_owned();
        let cseq = msg.header("CSeq").unwrap_or_default().to_owned();
        msg.body = message::open(&key.key, &call_id, &cseq, &msg.body)
            .map_err(|e| (400, "Bad Request", e.to_string()))?;
        let ctype = msg
            .header(CONTENT_TYPE_HEADER)
            .unwrap_or("text/plain")
            .to_owned();
        msg.set("Content-Type", &ctype);
        msg.remove(CONTENT_TYPE_HEADER);
        msg.remove(SESSION_HEADER);
        let Some(to) = self.next_hop(&mut msg, src) else {
            return Err((404, "Not Found", "no route to the softphone".into()));
        };
        self.add_via(&mut msg);
        self.send(&msg, to).await;
        Ok(())
    }

    /// Where a request goes next: the next Route (after ours), else the
    /// Request-URI — or, for a request addressed to this edge from outside,
    /// the softphone.
    fn next_hop(&self, msg: &mut Message, src: SocketAddr) -> Option<SocketAddr> {
        while msg.elements("Route").first().is_some_and(|r| self.is_me(r)) {
            msg.pop_front("Route");
        }
        if let Some(r) = msg.elements("Route").first() {
            return Uri::parse(r).and_then(|u| u.socket_addr());
        }
        let StartLine::Request { uri, .. } = &mut msg.start else {
            return None;
        };
        if self.is_me(uri) && src != self.cfg.ua {
            // Addressed to this edge: the subscriber behind it.
            let user = Uri::parse(uri).map(|u| u.user).unwrap_or_default();
            *uri = format!("sip:{user}@{}", self.cfg.ua);
            return Some(self.cfg.ua);
        }
        match Uri::parse(uri) {
            Some(u) => u.socket_addr().or(self.cfg.registrar),
            None => None,
        }
    }

    fn add_via(&self, msg: &mut Message) {
        let branch_in = msg
            .top_via()
            .and_then(|v| v.param("branch").flatten().map(str::to_owned))
            .unwrap_or_default();
        let h = qkdnet_crypto::sm3::sm3(
            format!("{branch_in}|{}|qkdnet-edge", self.cfg.listen).as_bytes(),
        );
        let branch = format!("z9hG4bK{}", hex(&h[..10]));
        // Where the responses go: the previous hop, as it sent the request.
        if let Some(back) = msg.top_via().and_then(|v| v.response_target()) {
            if let Ok(mut st) = self.state.lock() {
                let now = Instant::now();
                if st.sent.len() > 4096 {
                    st.sent
                        .retain(|_, (_, t)| now.duration_since(*t) < TRANSACTION_LIFE);
                }
                st.sent.insert(branch.clone(), (back, now));
            }
        }
        let via = Via {
            transport: "UDP".into(),
            host: self.cfg.listen.ip().to_string(),
            port: Some(self.cfg.listen.port()),
            params: vec![("branch".into(), Some(branch)), ("rport".into(), None)],
        };
        msg.push_front("Via", &via.to_string());
    }

    async fn forward_request(&self, mut msg: Message, src: SocketAddr, method: &str) {
        let Some(to) = self.next_hop(&mut msg, src) else {
            if method != "ACK" {
                self.refuse(&msg, src, 404, "Not Found", "no route to the Request-URI")
                    .await;
            }
            return;
        };
        let call_id = msg.call_id().unwrap_or_default().to_owned();
        if method == "BYE" || method == "CANCEL" {
            self.end_call(&call_id);
        } else if !msg.body.is_empty()
            && (method == "INVITE" || method == "ACK" || method == "UPDATE")
        {
            // A re-INVITE (or late answer in ACK): keep the media on the relay.
            if let Err(e) = self.relay_sdp(&mut msg, &call_id, src == self.cfg.ua) {
                self.refuse(&msg, src, 488, "Not Acceptable Here", &e).await;
                return;
            }
        }
        self.add_via(&mut msg);
        self.send(&msg, to).await;
    }

    /// Rewrites the SDP of a message of call `call_id`: what the softphone
    /// sends points at the wire leg (for the far edge), what comes from the
    /// far edge points at the softphone leg. Records where each side receives.
    fn relay_sdp(&self, msg: &mut Message, call_id: &str, from_ua: bool) -> Result<(), String> {
        let audio = sdp::audio(&msg.body).map_err(|e| e.to_string())?;
        let Ok(st) = self.state.lock() else {
            return Err("edge state poisoned".into());
        };
        let call = st
            .calls
            .get(call_id)
            .ok_or_else(|| "SDP for a call this edge does not relay".to_string())?;
        if from_ua {
            let _ = call.ua_rtp.send(Some(audio.rtp));
            if call.mode == Mode::Srtp {
                let (_, key) = srtp::crypto_of(&msg.body).ok_or_else(|| {
                    format!(
                        "srtp mode: the softphone's SDP has no {} key (mediaenc=srtp-mand)",
                        srtp::SUITE
                    )
                })?;
                let _ = call.ua_key.send(Some(key));
            }
            msg.body = sdp::rewrite(&msg.body, call.wire_leg, wire_proto(call.mode))
                .map_err(|e| e.to_string())?;
        } else {
            let _ = call.far_rtp.send(Some(audio.rtp));
            msg.body = ua_sdp(
                &msg.body,
                call.ua_leg,
                call.mode,
                call.ua_rx_key.as_ref(),
                call.crypto_tag,
            )?;
        }
        Ok(())
    }

    async fn response(&self, mut msg: Message) {
        // Our Via on top, else not ours to route.
        let Some(top) = msg.top_via() else { return };
        if top.host != self.cfg.listen.ip().to_string() || top.port != Some(self.cfg.listen.port())
        {
            tracing::warn!("dropped a response whose top Via is not this edge");
            return;
        }
        let branch = top.param("branch").flatten().unwrap_or_default().to_owned();
        let sent = match self.state.lock() {
            Ok(st) => st
                .sent
                .get(&branch)
                .filter(|(_, t)| t.elapsed() < TRANSACTION_LIFE)
                .map(|(a, _)| *a),
            Err(_) => None,
        };
        let Some(next) = sent else {
            tracing::warn!("dropped a response to no request this edge sent");
            return;
        };
        msg.pop_front("Via");
        let call_id = msg.call_id().unwrap_or_default().to_owned();
        let code = msg.code().unwrap_or(0);
        let is_invite = msg.cseq().is_some_and(|(_, m)| m == "INVITE");
        if is_invite && (101..300).contains(&code) {
            if let Err(why) = self.otp_answer(&mut msg, &call_id, next).await {
                // The caller's pad cannot be supplied: no call.
                tracing::warn!(code = 503, "refused: {why}");
                msg.start = StartLine::Response {
                    code: 503,
                    reason: "Service Unavailable".into(),
                };
                msg.body.clear();
                msg.remove("Content-Type");
                msg.headers.push((
                    "Warning".into(),
                    format!("399 qkdnet-edge \"{}\"", why.replace('"', "'")),
                ));
                self.end_call(&call_id);
                self.send(&msg, next).await;
                return;
            }
        }
        if is_invite && (180..300).contains(&code) && !msg.body.is_empty() {
            let from_ua = next != self.cfg.ua;
            if let Err(e) = self.relay_sdp(&mut msg, &call_id, from_ua) {
                tracing::warn!("answer SDP not relayed: {e}");
                msg.body.clear();
            }
        }
        if is_invite && code >= 300 {
            self.end_call(&call_id);
        }
        self.send(&msg, next).await;
    }

    /// `otp`: on the callee's side, names this edge's SAE in answers going to
    /// the far edge; on the caller's side, takes the far edge's SAE from the
    /// first answer and the first sending segment from the KME (an error:
    /// the call cannot have its pad).
    async fn otp_answer(
        &self,
        msg: &mut Message,
        call_id: &str,
        next: SocketAddr,
    ) -> Result<(), String> {
        let to_ua = next == self.cfg.ua;
        let (role, tx, first, key) = {
            let Ok(mut st) = self.state.lock() else {
                return Ok(());
            };
            let Some(call) = st.calls.get_mut(call_id) else {
                // An answer for an otp call this edge ended (no pad): not
                // passed on as a call.
                if to_ua && msg.header(SAE_HEADER).is_some() && msg.code().is_some_and(|c| c < 300)
                {
                    return Err("the call's pad could not be supplied".into());
                }
                return Ok(());
            };
            let Some(h) = call.otp.as_mut() else {
                return Ok(());
            };
            let first = to_ua && !h.started;
            if first {
                h.started = true;
            }
            (call.role, h.pad.clone(), first, h.key.clone())
        };
        let Some(kme) = self.cfg.kme.as_ref() else {
            return Err("this edge has no KME".into());
        };
        if !to_ua {
            if role == Role::Callee {
                msg.set(
                    SAE_HEADER,
                    &sae_header(&key, Direction::CalleeToCaller, &kme.sae),
                );
            }
            return Ok(());
        }
        let raw = msg.header(SAE_HEADER).unwrap_or_default().to_owned();
        msg.remove(SAE_HEADER);
        if !first {
            return Ok(());
        }
        let peer = checked_sae(&key, Direction::CalleeToCaller, &raw).ok_or_else(|| {
            format!("otp: the answer names no SAE bound to this call's session ({raw:?})")
        })?;
        // The far edge's pad can be fetched from now on (its announcements
        // may already be here).
        if let Ok(st) = self.state.lock() {
            if let Some(h) = st.calls.get(call_id).and_then(|c| c.otp.as_ref()) {
                let _ = h.peer_sae.send(Some(peer.clone()));
            }
        }
        let seg = fetch_out(kme, &peer)
            .await
            .map_err(|e| format!("no one-time pad for this call: {e}"))?;
        let _ = tx.send(PadEvent::Out(Ok(seg)));
        Ok(())
    }

    /// The caller's side of the key step and the INVITE toward the far edge.
    async fn outgoing_invite(
        self: &Arc<Self>,
        mut msg: Message,
        src: SocketAddr,
    ) -> Result<(), (u16, &'static str, String)> {
        let call_id = msg
            .call_id()
            .ok_or((400, "Bad Request", "no Call-ID".into()))?
            .to_owned();
        let audio = sdp::audio(&msg.body)
            .map_err(|e| (488, "Not Acceptable Here", format!("the offer: {e}")))?;
        let mode = self.cfg.mode;
        if mode == Mode::Otp && self.cfg.kme.is_none() {
            return Err((
                488,
                "Not Acceptable Here",
                "otp mode needs this edge to be an SAE of the QKD network (--connect, --as)".into(),
            ));
        }
        let ua_crypto = srtp::crypto_of(&msg.body);
        if mode == Mode::Srtp && ua_crypto.is_none() {
            return Err((
                488,
                "Not Acceptable Here",
                format!(
                    "srtp mode: the softphone offered no {} key (mediaenc=srtp-mand)",
                    srtp::SUITE
                ),
            ));
        }
        let Some(to) = self.next_hop(&mut msg, src) else {
            return Err((
                404,
                "Not Found",
                "the callee's edge is not an address".into(),
            ));
        };
        let StartLine::Request { uri, .. } = &msg.start else {
            return Err((400, "Bad Request", "not a request".into()));
        };
        let user = Uri::parse(uri).map(|u| u.user).unwrap_or_default();
        let callee = Identity::new(format!("sip:{user}@{}", self.cfg.domain))
            .map_err(|e| (404, "Not Found", format!("callee: {e}")))?;
        let mut sid = [0u8; SESSION_ID_LEN];
        getrandom::fill(&mut sid).map_err(|e| (500, "Server Internal Error", e.to_string()))?;
        let t0 = Instant::now();
        let key = self.key_step(Ask::Open(callee, sid)).await?;
        let key_ms = t0.elapsed().as_secs_f64() * 1e3;
        let peer = key.peer.as_str().to_owned();
        let (tag, ua_key) = match ua_crypto {
            Some((t, k)) => (t, Some(k)),
            None => (1, None),
        };
        let call = self
            .start_call(
                &call_id,
                Role::Caller,
                mode,
                &key,
                Some(audio.rtp),
                None,
                ua_key,
                tag,
                (mode == Mode::Otp).then_some((None, None)),
            )
            .await
            .map_err(|e| (500, "Server Internal Error", e))?;
        let mut call = call;
        call.key_ms = key_ms;
        let wire = call.wire_leg;
        if let Ok(mut st) = self.state.lock() {
            st.calls.insert(call_id, call);
        }
        msg.body = sdp::rewrite(&msg.body, wire, wire_proto(mode))
            .map_err(|e| (488, "Not Acceptable Here", e.to_string()))?;
        msg.set(SESSION_HEADER, &hex(&sid));
        msg.set(MODE_HEADER, mode.name());
        if let (Mode::Otp, Some(kme)) = (mode, self.cfg.kme.as_ref()) {
            msg.set(
                SAE_HEADER,
                &sae_header(&key.key, Direction::CallerToCallee, &kme.sae),
            );
        }
        msg.push_front("Record-Route", &format!("<{};lr>", self.my_uri()));
        self.add_via(&mut msg);
        tracing::info!(peer, "calling with a quantum session key");
        self.send(&msg, to).await;
        Ok(())
    }

    /// The callee's side: join the session, check the caller, pass the INVITE on.
    async fn incoming_invite(
        self: &Arc<Self>,
        mut msg: Message,
        src: SocketAddr,
    ) -> Result<(), (u16, &'static str, String)> {
        let call_id = msg
            .call_id()
            .ok_or((400, "Bad Request", "no Call-ID".into()))?
            .to_owned();
        let not_quantum = |what: &str| {
            (
                488,
                "Not Acceptable Here",
                format!("not a quantum-keyed call: {what}"),
            )
        };
        let sid = msg
            .header(SESSION_HEADER)
            .and_then(unhex)
            .ok_or_else(|| not_quantum("no session ID"))?;
        let mode = msg
            .header(MODE_HEADER)
            .and_then(Mode::parse)
            .ok_or_else(|| not_quantum("no supported media mode"))?;
        let audio = sdp::audio(&msg.body)
            .map_err(|e| (488, "Not Acceptable Here", format!("the offer: {e}")))?;
        let otp_peer = if mode == Mode::Otp {
            if self.cfg.kme.is_none() {
                return Err((
                    488,
                    "Not Acceptable Here",
                    "otp: the callee's edge is not an SAE of the QKD network".into(),
                ));
            }
            let raw = msg.header(SAE_HEADER).unwrap_or_default();
            if raw.is_empty() {
                return Err(not_quantum("otp without the caller's SAE"));
            }
            Some(raw.to_owned())
        } else {
            None
        };
        let t0 = Instant::now();
        let key = self.join_from(&msg, sid, "call").await?;
        let key_ms = t0.elapsed().as_secs_f64() * 1e3;
        // otp: the caller's SAE must be bound to the session just joined.
        let otp_peer = match otp_peer {
            Some(raw) => Some(
                checked_sae(&key.key, Direction::CallerToCallee, &raw).ok_or((
                    403,
                    "Forbidden",
                    "otp: the INVITE names an SAE not bound to the call's session".to_string(),
                ))?,
            ),
            None => None,
        };
        // otp: this direction's first pad segment before the phone rings.
        let first = match (&otp_peer, self.cfg.kme.as_ref()) {
            (Some(peer), Some(kme)) => Some(fetch_out(kme, peer).await.map_err(|e| {
                (
                    503,
                    "Service Unavailable",
                    format!("no one-time pad for this call: {e}"),
                )
            })?),
            _ => None,
        };
        let call = self
            .start_call(
                &call_id,
                Role::Callee,
                mode,
                &key,
                None,
                Some(audio.rtp),
                None,
                1,
                otp_peer.map(|p| (Some(p), first)),
            )
            .await
            .map_err(|e| (500, "Server Internal Error", e))?;
        let mut call = call;
        call.key_ms = key_ms;
        let body = ua_sdp(&msg.body, call.ua_leg, mode, call.ua_rx_key.as_ref(), 1)
            .map_err(|e| (488, "Not Acceptable Here", e));
        if let Ok(mut st) = self.state.lock() {
            st.calls.insert(call_id.clone(), call);
        }
        let Some(to) = self.next_hop(&mut msg, src) else {
            self.end_call(&call_id);
            return Err((404, "Not Found", "no route to the softphone".into()));
        };
        msg.body = match body {
            Ok(b) => b,
            Err(e) => {
                self.end_call(&call_id);
                return Err(e);
            }
        };
        msg.remove(SESSION_HEADER);
        msg.remove(MODE_HEADER);
        msg.remove(SAE_HEADER);
        msg.push_front("Record-Route", &format!("<{};lr>", self.my_uri()));
        self.add_via(&mut msg);
        tracing::info!(
            caller = key.peer.as_str(),
            mode = mode.name(),
            "incoming quantum call"
        );
        self.send(&msg, to).await;
        Ok(())
    }

    /// Joins session `sid` and checks that its other party is the one the
    /// request's From names (`what`: "call", "message", for the refusal).
    async fn join_from(
        &self,
        msg: &Message,
        sid: [u8; SESSION_ID_LEN],
        what: &str,
    ) -> Result<qkdnet_media::proto::SessionKey, (u16, &'static str, String)> {
        let key = self.key_step(Ask::Join(sid)).await?;
        let claimed = msg
            .header("From")
            .and_then(Uri::parse)
            .map(|u| format!("sip:{}@{}", u.user, self.cfg.domain))
            .unwrap_or_default();
        if key.peer.as_str() != claimed {
            return Err((
                403,
                "Forbidden",
                format!(
                    "the session's other party is {}, the {what} claims {claimed}",
                    key.peer.as_str()
                ),
            ));
        }
        Ok(key)
    }

    /// Runs one request at the key service with the medium.
    async fn key_step(
        &self,
        ask: Ask,
    ) -> Result<qkdnet_media::proto::SessionKey, (u16, &'static str, String)> {
        let unavailable = |e: String| {
            (
                503,
                "Service Unavailable",
                format!("no quantum key for this call: {e}"),
            )
        };
        let mut conn = Connection::connect(&self.cfg.keyservice, Duration::from_secs(5))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let mut medium = self.medium.lock().await;
        let mut t = Terminal::new(medium.as_mut()).map_err(|e| unavailable(e.to_string()))?;
        let r = match ask {
            Ask::Open(peer, sid) => t.open(&mut conn, &peer, sid).await,
            Ask::Join(sid) => t.join(&mut conn, sid).await,
        };
        r.map_err(|e| unavailable(e.to_string()))
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_call(
        self: &Arc<Self>,
        call_id: &str,
        role: Role,
        mode: Mode,
        key: &qkdnet_media::proto::SessionKey,
        ua_rtp: Option<SocketAddr>,
        far_rtp: Option<SocketAddr>,
        ua_key: Option<srtp::MasterKey>,
        crypto_tag: u32,
        otp: Option<(Option<String>, Option<Fetched>)>,
    ) -> Result<Call, String> {
        let (ua_a, ua_b) = bind_pair(self.cfg.local_ip)
            .await
            .map_err(|e| e.to_string())?;
        let (w_a, w_b) = bind_pair(self.cfg.media_ip)
            .await
            .map_err(|e| e.to_string())?;
        let ua_leg = ua_a.local_addr().map_err(|e| e.to_string())?;
        let wire_leg = w_a.local_addr().map_err(|e| e.to_string())?;
        let (out_dir, in_dir) = match role {
            Role::Caller => (Direction::CallerToCallee, Direction::CalleeToCaller),
            Role::Callee => (Direction::CalleeToCaller, Direction::CallerToCallee),
        };
        let (key_tx, key_rx) = watch::channel(ua_key);
        let (out, inn, ua_rx_key) = match mode {
            Mode::Otp => (Out::Otp(OtpSend::new()), In::Otp(OtpRecv::new()), None),
            Mode::Sm4 => (
                Out::Sm4(Protect::new(&key.key, out_dir)),
                In::Sm4 {
                    rx: vec![Unprotect::new(&key.key, in_dir)],
                    dropped: Counters::default(),
                    passed: 0,
                },
                None,
            ),
            Mode::Srtp => {
                let tx = srtp_master_key(&key.key, out_dir);
                let rx = srtp_master_key(&key.key, in_dir);
                (
                    Out::Srtp {
                        q: srtp::Context::new(&tx),
                        ua: None,
                        ua_key: key_rx,
                    },
                    In::Srtp {
                        q: srtp::Context::new(&rx),
                        dropped: Counters::default(),
                        passed: 0,
                    },
                    Some(rx),
                )
            }
        };
        let (ua_tx, ua_rx) = watch::channel(ua_rtp);
        let (far_tx, far_rx) = watch::channel(far_rtp);
        let stats = Arc::new(Mutex::new(RelayStats::default()));
        let edge = Arc::downgrade(self);
        let id = call_id.to_owned();
        let (ctl, handle) = match (otp, self.cfg.kme.clone()) {
            (Some((peer, first)), Some(kme)) => {
                let (tx, rx) = mpsc::unbounded_channel();
                if let Some(f) = first {
                    let _ = tx.send(PadEvent::Out(Ok(f)));
                }
                let (peer_tx, peer_rx) = watch::channel(peer);
                let ctl = OtpCtl {
                    kme,
                    peer: peer_rx,
                    tx: tx.clone(),
                    rx,
                    ann_out: AnnounceKey::derive(&key.key, out_dir),
                    ann_in: AnnounceKey::derive(&key.key, in_dir),
                    fetching: false,
                    retry_at: Instant::now(),
                    repeats: Vec::new(),
                    latest: None,
                    parked: Vec::new(),
                    held: std::collections::VecDeque::new(),
                    rt: tokio::runtime::Handle::current(),
                };
                let handle = OtpHandle {
                    peer_sae: peer_tx,
                    pad: tx,
                    started: role == Role::Callee,
                    key: key.key.clone(),
                };
                (Some(ctl), Some(handle))
            }
            (Some(_), None) => return Err("otp mode without a KME".into()),
            _ => (None, None),
        };
        let rekeying = match (mode, self.cfg.rekey) {
            (Mode::Sm4, every) => {
                // Only the caller's edge starts a rekey.
                let every = every.filter(|_| role == Role::Caller);
                let (tx, rx) = mpsc::unbounded_channel();
                Some(Rekeying {
                    edge: Arc::downgrade(self),
                    role,
                    peer: key.peer.clone(),
                    every,
                    next_at: every.map(|e| Instant::now() + e),
                    keys: vec![(0, key.key.clone())],
                    pending: None,
                    pending_since: None,
                    failed: Vec::new(),
                    busy: false,
                    dirs: (out_dir, in_dir),
                    tx,
                    rx,
                    rt: tokio::runtime::Handle::current(),
                })
            }
            _ => None,
        };
        // The relay runs on a thread of its own (a current-thread runtime):
        // a packet then wakes only that thread, not a worker of the shared
        // runtime (BENCHMARKS.md: per-packet latency through the edges).
        let socks = [ua_a, ua_b, w_a, w_b]
            .map(|s| s.into_std())
            .into_iter()
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stats_relay = stats.clone();
        std::thread::Builder::new()
            .name("qkdnet-relay".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(call = id, "no runtime for the media relay: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut tokio_socks = Vec::with_capacity(4);
                    for s in socks {
                        match UdpSocket::from_std(s) {
                            Ok(s) => tokio_socks.push(s),
                            Err(e) => {
                                tracing::error!(call = id, "media relay socket: {e}");
                                return;
                            }
                        }
                    }
                    let Ok(socks) = <[UdpSocket; 4]>::try_from(tokio_socks) else {
                        return;
                    };
                    let idle = relay(
                        socks,
                        out,
                        inn,
                        ua_rx,
                        far_rx,
                        stats_relay,
                        ctl,
                        rekeying,
                        stop_rx,
                    )
                    .await;
                    // Idle for MEDIA_IDLE: the call is over whether or not a BYE came.
                    if idle {
                        if let Some(edge) = edge.upgrade() {
                            tracing::warn!(
                                call = id,
                                "no media for {} s: call ended",
                                MEDIA_IDLE.as_secs()
                            );
                            edge.end_call(&id);
                        }
                    }
                });
            })
            .map_err(|e| e.to_string())?;
        let relay = stop_tx;
        Ok(Call {
            role,
            mode,
            ua_rx_key,
            crypto_tag,
            ua_key: key_tx,
            session: key.session_id,
            source: key.source,
            peer: key.peer.as_str().to_owned(),
            ua_leg,
            wire_leg,
            ua_rtp: ua_tx,
            far_rtp: far_tx,
            relay,
            stats,
            started: Instant::now(),
            key_ms: 0.0,
            otp: handle,
        })
    }

    fn end_call(&self, call_id: &str) {
        let call = match self.state.lock() {
            Ok(mut st) => st.calls.remove(call_id),
            Err(_) => None,
        };
        let Some(call) = call else { return };
        let _ = call.relay.send(true);
        let s = call.stats.lock().map(|s| *s).unwrap_or_default();
        let report = CallReport {
            call_id: call_id.to_owned(),
            role: match call.role {
                Role::Caller => "caller",
                Role::Callee => "callee",
            },
            mode: call.mode.name(),
            session: hex(&call.session),
            key_source: match call.source {
                KeySource::Qkd => "qkd",
                _ => "csprng",
            },
            peer: call.peer,
            seconds: call.started.elapsed().as_secs_f64(),
            sent: s.sent,
            received: s.received,
            dropped_auth: s.auth,
            dropped_replay: s.replay,
            dropped_other: s.other,
            medium_keys: 2 + 2 * s.rekeys,
            key_ms: call.key_ms,
            pad_keys: s.pad_keys,
            pad_bytes: s.pad_bytes,
            pad_used_bytes: s.pad_used,
            dropped_no_pad: s.no_pad,
            talk_seconds_left: s
                .stock_bits
                .map(|b| (b / 8) as f64 / (2 * otp::G711_PAD_PER_SECOND) as f64),
            rekeys: s.rekeys,
        };
        (self.on_report)(&report);
        if let Ok(mut r) = self.reports.lock() {
            r.push(report);
        }
    }
}

fn wire_proto(mode: Mode) -> &'static str {
    match mode {
        Mode::Srtp => "RTP/SAVP",
        Mode::Sm4 | Mode::Otp => "RTP/AVP",
    }
}

/// The SDP handed to the softphone: pointed at its leg of the relay; in
/// `srtp` mode with the quantum-derived key it decrypts with.
fn ua_sdp(
    body: &[u8],
    leg: SocketAddr,
    mode: Mode,
    rx_key: Option<&srtp::MasterKey>,
    tag: u32,
) -> Result<Vec<u8>, String> {
    let crypto = match (mode, rx_key) {
        (Mode::Srtp, Some(k)) => Some(format!(
            "a=crypto:{tag} {} inline:{}",
            srtp::SUITE,
            k.to_inline()
        )),
        (Mode::Srtp, None) => return Err("srtp mode without a key".into()),
        (Mode::Sm4 | Mode::Otp, _) => None,
    };
    sdp::rewrite_with(body, leg, wire_proto(mode), crypto.as_deref()).map_err(|e| e.to_string())
}

/// The SRTP master key of direction `dir` of a call keyed by `session`: what
/// both edges derive (HKDF-SM3, one key per direction); public for audits
/// and tests that decrypt a capture with the issued key.
pub fn srtp_master_key(session: &qkdnet_media::Key256, dir: Direction) -> srtp::MasterKey {
    let okm = qkdnet_crypto::kdf::hkdf_sm3(
        b"qkdnet call srtp v1",
        session.expose_secret(),
        &[match dir {
            Direction::CallerToCallee => b"caller->callee",
            Direction::CalleeToCaller => b"callee->caller",
        }],
        srtp::KEY_LEN + srtp::SALT_LEN,
    )
    .expect("invariant: 30 bytes is a valid HKDF-SM3 length");
    srtp::MasterKey::from_bytes(okm.expose_secret()).expect("invariant: 30 bytes")
}

/// What the relay does to packets from the softphone.
enum Out {
    Otp(OtpSend),
    Sm4(Protect),
    Srtp {
        q: srtp::Context,
        ua: Option<srtp::Context>,
        ua_key: watch::Receiver<Option<srtp::MasterKey>>,
    },
}

impl Out {
    fn apply(&mut self, p: &mut Vec<u8>, rtcp: bool) -> Result<(), Discard> {
        match self {
            Self::Otp(s) => s.protect(p),
            Self::Sm4(protect) => {
                if rtcp || is_rtcp(p) {
                    protect.rtcp(p)
                } else {
                    protect.rtp(p)
                }
            }
            Self::Srtp { q, ua, ua_key } => {
                if ua_key.has_changed().unwrap_or(false) || ua.is_none() {
                    *ua = ua_key.borrow_and_update().as_ref().map(srtp::Context::new);
                }
                let Some(ua) = ua else {
                    return Err(Discard::Malformed);
                };
                if rtcp {
                    ua.unprotect_rtcp(p)?;
                    q.protect_rtcp(p)
                } else {
                    ua.unprotect_rtp(p)?;
                    q.protect_rtp(p)
                }
            }
        }
    }
}

/// What the relay does to packets from the far edge.
enum In {
    Otp(OtpRecv),
    /// The receivers of the current epoch and, around a rekey, of the one
    /// before (newest last), and what they dropped and passed together.
    Sm4 {
        rx: Vec<Unprotect>,
        dropped: Counters,
        passed: u64,
    },
    /// Checked with the quantum-derived key and passed on as they came (the
    /// softphone decrypts them).
    Srtp {
        q: srtp::Context,
        dropped: Counters,
        passed: u64,
    },
}

impl In {
    fn apply(&mut self, p: &mut Vec<u8>, rtcp: bool) -> Result<(), Discard> {
        match self {
            Self::Otp(r) => r.open(p),
            Self::Sm4 {
                rx,
                dropped,
                passed,
            } => {
                let mut r = Err(Discard::Malformed);
                for u in rx.iter_mut().rev() {
                    r = u.try_open(p);
                    if !matches!(r, Err(Discard::Auth)) {
                        break;
                    }
                }
                match r {
                    Ok(()) => *passed += 1,
                    Err(d) => dropped.count(d),
                }
                r
            }
            Self::Srtp { q, dropped, passed } => {
                let mut copy = p.clone();
                let r = if rtcp {
                    q.unprotect_rtcp(&mut copy)
                } else {
                    q.unprotect_rtp(&mut copy)
                };
                match r {
                    Ok(()) => *passed += 1,
                    Err(d) => dropped.count(d),
                }
                r
            }
        }
    }

    fn stats(&self) -> (u64, Counters) {
        match self {
            Self::Otp(r) => (r.passed, r.dropped),
            Self::Sm4 {
                dropped, passed, ..
            } => (*passed, *dropped),
            Self::Srtp {
                dropped, passed, ..
            } => (*passed, *dropped),
        }
    }
}

/// `otp`: what the relay needs besides the packets: the KME, the far SAE,
/// the pad arriving from fetches, announcements to repeat.
struct OtpCtl {
    kme: KmeLink,
    peer: watch::Receiver<Option<String>>,
    tx: mpsc::UnboundedSender<PadEvent>,
    rx: mpsc::UnboundedReceiver<PadEvent>,
    ann_out: AnnounceKey,
    ann_in: AnnounceKey,
    /// A sending segment is being fetched.
    fetching: bool,
    /// After a failed fetch, not before this.
    retry_at: Instant,
    /// Announcements to send again (bytes, times left).
    repeats: Vec<(Vec<u8>, u32)>,
    /// The newest announcement (sent again every [`ANNOUNCE_KEEP_EVERY`]
    /// packets for the whole call).
    latest: Option<Vec<u8>>,
    /// Announcements that came before the far edge's SAE was known (the
    /// caller's edge learns it from the answer), handled once it is.
    parked: Vec<Vec<u8>>,
    /// Packets from the far edge whose pad is being fetched (arrival, RTCP
    /// socket?, bytes), opened when it comes (or dropped after
    /// [`otp::HOLD`]).
    held: std::collections::VecDeque<(Instant, bool, Vec<u8>)>,
    /// The edge's runtime, where KME requests run (its connections outlive
    /// the call's relay thread).
    rt: tokio::runtime::Handle,
}

/// Times an announcement is repeated after its first sending (every
/// [`ANNOUNCE_EVERY`] packets).
const ANNOUNCE_REPEATS: u32 = 5;
/// A rekey offer not acknowledged in this time is given up.
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);
/// Announcements kept while the far SAE is unknown.
const MAX_PARKED: usize = 4;
const ANNOUNCE_EVERY: u64 = 10;
const ANNOUNCE_KEEP_EVERY: u64 = 50;

impl OtpCtl {
    /// Starts a fetch of the next sending segment when less than a segment
    /// is left (about 1.9 s of G.711 with the default 16 keys of 8192 bits:
    /// the time the far edge has to fetch it by ID before it is needed).
    fn refill(&mut self, send: &OtpSend) {
        let segment = self.kme.keys_per_fetch * (self.kme.key_bits / 8);
        if self.fetching || send.remaining() >= segment || Instant::now() < self.retry_at {
            return;
        }
        let Some(peer) = self.peer.borrow().clone() else {
            return;
        };
        self.fetching = true;
        let (kme, tx) = (self.kme.clone(), self.tx.clone());
        self.rt.spawn(async move {
            let r = fetch_out(&kme, &peer).await;
            let _ = tx.send(PadEvent::Out(r));
        });
    }

    /// An announcement from the far edge: fetch its keys if new.
    fn announced(&mut self, p: &[u8], recv: &mut OtpRecv) {
        let a = match self.ann_in.decode(p) {
            Ok(a) => a,
            Err(e) => {
                recv.dropped.count(match e {
                    otp::AnnounceError::Auth => Discard::Auth,
                    otp::AnnounceError::Malformed => Discard::Malformed,
                });
                return;
            }
        };
        let Some(peer) = self.peer.borrow().clone() else {
            if self.parked.len() < MAX_PARKED {
                self.parked.push(p.to_vec());
            }
            return;
        };
        if !recv.wants(&a) {
            return;
        }
        let (kme, tx) = (self.kme.clone(), self.tx.clone());
        self.rt.spawn(async move {
            let r = fetch_in(&kme, &peer, &a.ids).await;
            let r = r.and_then(|pad| {
                if pad.len() as u64 == a.len() {
                    Ok(pad)
                } else {
                    Err(format!(
                        "{} bytes of keys for a {}-byte segment",
                        pad.len(),
                        a.len()
                    ))
                }
            });
            let _ = tx.send(PadEvent::In(a.start, a.ids.len() as u64, r));
        });
    }
}

/// `sm4` rekeying of one call ([`crate::rekey`]): the caller's edge opens a
/// new session every `every` and offers it; the callee's edge joins and acks.
struct Rekeying {
    edge: std::sync::Weak<Edge>,
    role: Role,
    peer: Identity,
    every: Option<Duration>,
    next_at: Option<Instant>,
    /// Keys by epoch, the last two; the last is the one this edge sends
    /// under.
    keys: Vec<(u32, qkdnet_media::Key256)>,
    /// Caller: opened, offered, not acknowledged yet (since when).
    pending: Option<(u32, [u8; SESSION_ID_LEN], qkdnet_media::Key256)>,
    pending_since: Option<Instant>,
    /// Callee: sessions it could not join (never asked again: each try
    /// spends medium keys).
    failed: Vec<[u8; SESSION_ID_LEN]>,
    /// A key step is running.
    busy: bool,
    /// (sending, receiving) directions.
    dirs: (Direction, Direction),
    tx: mpsc::UnboundedSender<RekeyEvent>,
    rx: mpsc::UnboundedReceiver<RekeyEvent>,
    /// The edge's runtime, where key steps run.
    rt: tokio::runtime::Handle,
}

enum RekeyEvent {
    /// A key step for `epoch` finished (caller: opened; callee: joined).
    Key(
        u32,
        [u8; SESSION_ID_LEN],
        Result<qkdnet_media::proto::SessionKey, String>,
    ),
}

impl Rekeying {
    /// The epoch this edge sends under.
    fn epoch(&self) -> u32 {
        self.keys.last().map_or(0, |(e, _)| *e)
    }

    fn key(&self, epoch: u32) -> Option<&qkdnet_media::Key256> {
        self.keys.iter().find(|(e, _)| *e == epoch).map(|(_, k)| k)
    }

    fn due(&self) -> Option<Instant> {
        if self.busy {
            return None;
        }
        if self.pending.is_some() {
            return self.pending_since.map(|t| t + OFFER_TIMEOUT);
        }
        self.next_at
    }

    /// Caller: open the next epoch's session (or give up an offer that was
    /// not acknowledged in time).
    fn start(&mut self) {
        let retry = Instant::now() + Duration::from_secs(30);
        if self.pending.take().is_some() {
            self.pending_since = None;
            tracing::warn!("rekey: the far edge did not take the new key; the call keeps its key");
            self.next_at = self.every.map(|e| (Instant::now() + e).min(retry));
            return;
        }
        self.next_at = Some(retry);
        let Some(edge) = self.edge.upgrade() else {
            return;
        };
        let mut sid = [0u8; SESSION_ID_LEN];
        if getrandom::fill(&mut sid).is_err() {
            return;
        }
        self.busy = true;
        let (epoch, peer, tx) = (self.epoch() + 1, self.peer.clone(), self.tx.clone());
        self.rt.spawn(async move {
            let r = edge.key_step(Ask::Open(peer, sid)).await;
            let _ = tx.send(RekeyEvent::Key(epoch, sid, r.map_err(|e| e.2)));
        });
    }

    /// Caller: the offer to (re)send before this packet, if one is pending.
    fn offer(&self, sent: u64) -> Option<Vec<u8>> {
        let (epoch, sid, _) = self.pending.as_ref()?;
        if sent % ANNOUNCE_EVERY != 0 {
            return None;
        }
        let k = self.key(epoch - 1)?;
        Some(ControlKey::derive(k, self.dirs.0).encode(&Control {
            kind: Kind::Offer,
            epoch: *epoch,
            session: *sid,
        }))
    }

    /// A key step finished: what to send the far edge now, if anything.
    fn event(
        &mut self,
        ev: RekeyEvent,
        out: &mut Out,
        inn: &mut In,
        stats: &Arc<Mutex<RelayStats>>,
    ) -> Option<Vec<u8>> {
        let RekeyEvent::Key(epoch, sid, r) = ev;
        self.busy = false;
        let key = match r {
            Ok(k) if k.peer == self.peer => k.key,
            Ok(k) => {
                tracing::warn!(
                    peer = k.peer.as_str(),
                    "rekey: the new session names another party; ignored"
                );
                self.next_at = self.every.map(|e| Instant::now() + e);
                return None;
            }
            Err(e) => {
                if self.role == Role::Callee && self.failed.len() < 16 {
                    self.failed.push(sid);
                }
                tracing::warn!("rekey: no new key ({e}); the call keeps its key and retries");
                self.next_at = self
                    .every
                    .map(|e| Instant::now() + e.min(Duration::from_secs(30)));
                return None;
            }
        };
        if let In::Sm4 { rx, .. } = inn {
            rx.push(Unprotect::new(&key, self.dirs.1));
            if rx.len() > 2 {
                rx.remove(0);
            }
        }
        match self.role {
            Role::Caller => {
                let prev = self.key(epoch - 1)?;
                let m = ControlKey::derive(prev, self.dirs.0).encode(&Control {
                    kind: Kind::Offer,
                    epoch,
                    session: sid,
                });
                self.pending = Some((epoch, sid, key));
                self.pending_since = Some(Instant::now());
                Some(m)
            }
            Role::Callee => {
                *out = Out::Sm4(Protect::new(&key, self.dirs.0));
                let m = ControlKey::derive(&key, self.dirs.0).encode(&Control {
                    kind: Kind::Ack,
                    epoch,
                    session: sid,
                });
                self.switched(epoch, key, stats);
                Some(m)
            }
        }
    }

    fn switched(&mut self, epoch: u32, key: qkdnet_media::Key256, stats: &Arc<Mutex<RelayStats>>) {
        self.keys.push((epoch, key));
        if self.keys.len() > 2 {
            self.keys.remove(0);
        }
        self.next_at = self.every.map(|e| Instant::now() + e);
        if let Ok(mut s) = stats.lock() {
            s.rekeys += 1;
        }
        tracing::info!(epoch, "call rekeyed with a new quantum session key");
    }

    /// A rekey message from the far edge: what to answer, if anything.
    fn control(
        &mut self,
        p: &[u8],
        out: &mut Out,
        stats: &Arc<Mutex<RelayStats>>,
    ) -> Option<Vec<u8>> {
        match self.role {
            Role::Callee => {
                // An offer for the next epoch (under the current key), or a
                // repeat of the one just joined (its ack was lost).
                let current = self.epoch();
                for epoch in [current + 1, current] {
                    let Some(k) = self.key(epoch.wrapping_sub(1)) else {
                        continue;
                    };
                    let Ok(c) = ControlKey::derive(k, self.dirs.1).decode(p) else {
                        continue;
                    };
                    if c.kind != Kind::Offer || c.epoch != epoch {
                        return None;
                    }
                    if epoch == current {
                        let cur = self.key(epoch)?;
                        return Some(ControlKey::derive(cur, self.dirs.0).encode(&Control {
                            kind: Kind::Ack,
                            ..c
                        }));
                    }
                    if self.busy || self.failed.contains(&c.session) {
                        return None;
                    }
                    let edge = self.edge.upgrade()?;
                    self.busy = true;
                    let tx = self.tx.clone();
                    self.rt.spawn(async move {
                        let r = edge.key_step(Ask::Join(c.session)).await;
                        let _ = tx.send(RekeyEvent::Key(epoch, c.session, r.map_err(|e| e.2)));
                    });
                    return None;
                }
                None
            }
            Role::Caller => {
                let (epoch, sid, key) = self.pending.as_ref()?;
                let c = ControlKey::derive(key, self.dirs.1).decode(p).ok()?;
                if c.kind != Kind::Ack || c.epoch != *epoch || c.session != *sid {
                    return None;
                }
                let (epoch, _, key) = self.pending.take()?;
                self.pending_since = None;
                *out = Out::Sm4(Protect::new(&key, self.dirs.0));
                self.switched(epoch, key, stats);
                None
            }
        }
    }
}

/// The media relay of one call: `[ua_rtp, ua_rtcp, wire_rtp, wire_rtcp]`.
async fn relay(
    socks: [UdpSocket; 4],
    mut out: Out,
    mut inn: In,
    ua: watch::Receiver<Option<SocketAddr>>,
    far: watch::Receiver<Option<SocketAddr>>,
    stats: Arc<Mutex<RelayStats>>,
    mut otp: Option<OtpCtl>,
    mut rk: Option<Rekeying>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let [ua_rtp, ua_rtcp, wire_rtp, wire_rtcp] = socks;
    let (mut b0, mut b1, mut b2, mut b3) = ([0u8; 2048], [0u8; 2048], [0u8; 2048], [0u8; 2048]);
    let mut sent_packets = 0u64;
    // Only the softphone's packets and far-edge packets that verify keep the
    // call alive (not any datagram sent to the wire port).
    let mut last_heard = Instant::now();
    loop {
        let idle = tokio::time::sleep_until((last_heard + MEDIA_IDLE).into());
        let pad_event = async {
            match otp.as_mut() {
                Some(c) => c.rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let rekey_due = rk.as_ref().and_then(|r| r.due());
        let rekey_timer = async {
            match rekey_due {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let rekey_event = async {
            match rk.as_mut() {
                Some(r) => r.rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let (which, p) = tokio::select! {
            () = idle => return true,
            _ = stop.changed() => return false,
            () = rekey_timer => {
                if let Some(r) = rk.as_mut() {
                    r.start();
                }
                continue;
            }
            Some(ev) = rekey_event => {
                if let Some(r) = rk.as_mut() {
                    let far = *far.borrow();
                    if let Some(m) = r.event(ev, &mut out, &mut inn, &stats) {
                        if let Some(far) = far {
                            let _ = wire_rtp.send_to(&m, far).await;
                        }
                    }
                }
                continue;
            }
            Some(ev) = pad_event => {
                pad(
                    ev,
                    &mut otp,
                    &mut out,
                    &mut inn,
                    [&ua_rtp, &ua_rtcp, &wire_rtp],
                    &ua,
                    &far,
                    &stats,
                )
                .await;
                continue;
            }
            r = ua_rtp.recv_from(&mut b0) => (0, r.map(|(n, _)| b0[..n].to_vec())),
            r = ua_rtcp.recv_from(&mut b1) => (1, r.map(|(n, _)| b1[..n].to_vec())),
            r = wire_rtp.recv_from(&mut b2) => (2, r.map(|(n, _)| b2[..n].to_vec())),
            r = wire_rtcp.recv_from(&mut b3) => (3, r.map(|(n, _)| b3[..n].to_vec())),
        };
        let Ok(mut p) = p else { continue };
        match which {
            0 | 1 => {
                last_heard = Instant::now();
                let Some(far) = *far.borrow() else { continue };
                if let Some(offer) = rk.as_ref().and_then(|r| r.offer(sent_packets)) {
                    let _ = wire_rtp.send_to(&offer, far).await;
                }
                if let (Some(c), Out::Otp(send)) = (otp.as_mut(), &out) {
                    c.refill(send);
                    // Before the 1st, 11th, 21st… packet: the far edge may not
                    // have been able to use the first sending (the caller's
                    // edge learns the callee's SAE only from the answer).
                    if sent_packets % ANNOUNCE_EVERY == 0 {
                        for (a, left) in &mut c.repeats {
                            let _ = wire_rtp.send_to(a, far).await;
                            *left -= 1;
                        }
                        c.repeats.retain(|(_, left)| *left > 0);
                    }
                    // The newest announcement keeps coming now and then, so a
                    // far edge that lost every repeat still gets its pad.
                    if sent_packets % ANNOUNCE_KEEP_EVERY == ANNOUNCE_EVERY / 2 {
                        if let Some(a) = c.latest.as_ref() {
                            let _ = wire_rtp.send_to(a, far).await;
                        }
                    }
                }
                let r = out.apply(&mut p, which == 1);
                if let (Out::Otp(send), Ok(mut s)) = (&out, stats.lock()) {
                    s.pad_used = send.used_bytes;
                    s.no_pad = send.no_pad + inn.stats().1.no_pad;
                }
                if r.is_ok() {
                    let to = if which == 0 { far } else { plus_one(far) };
                    let sock = if which == 0 { &wire_rtp } else { &wire_rtcp };
                    if sock.send_to(&p, to).await.is_ok() {
                        if let Ok(mut s) = stats.lock() {
                            s.sent += 1;
                        }
                    }
                    sent_packets += 1;
                }
            }
            _ => {
                if let Some(r) = rk.as_mut() {
                    if rekey::is_control(&p) {
                        if let Some(m) = r.control(&p, &mut out, &stats) {
                            let far = *far.borrow();
                            if let Some(far) = far {
                                let _ = wire_rtp.send_to(&m, far).await;
                            }
                        }
                        continue;
                    }
                }
                if let (Some(c), In::Otp(recv)) = (otp.as_mut(), &mut inn) {
                    if !c.parked.is_empty() && c.peer.borrow().is_some() {
                        for a in std::mem::take(&mut c.parked) {
                            c.announced(&a, recv);
                        }
                    }
                    if otp::is_announce(&p) {
                        c.announced(&p, recv);
                        continue;
                    }
                    if !recv.pad_here(&p) && c.held.len() < otp::MAX_HELD {
                        c.held.push_back((Instant::now(), which == 3, p));
                        continue;
                    }
                }
                let r = inn.apply(&mut p, which == 3);
                let (passed, dropped) = inn.stats();
                if let Ok(mut s) = stats.lock() {
                    s.received = passed;
                    s.auth = dropped.auth;
                    s.replay = dropped.replay;
                    s.other = dropped.malformed + dropped.ssrcs;
                    if let Out::Otp(send) = &out {
                        s.no_pad = send.no_pad + dropped.no_pad;
                    }
                }
                if r.is_err() {
                    continue;
                }
                last_heard = Instant::now();
                let Some(ua) = *ua.borrow() else { continue };
                let (to, sock) = if which == 2 {
                    (ua, &ua_rtp)
                } else {
                    (plus_one(ua), &ua_rtcp)
                };
                let _ = sock.send_to(&p, to).await;
            }
        }
    }
}

/// `otp`: pad arriving in the relay from a fetch.
#[allow(clippy::too_many_arguments)]
async fn pad(
    ev: PadEvent,
    otp: &mut Option<OtpCtl>,
    out: &mut Out,
    inn: &mut In,
    [ua_rtp, ua_rtcp, wire_rtp]: [&UdpSocket; 3],
    ua: &watch::Receiver<Option<SocketAddr>>,
    far: &watch::Receiver<Option<SocketAddr>>,
    stats: &Arc<Mutex<RelayStats>>,
) {
    let (Some(c), Out::Otp(send), In::Otp(recv)) = (otp.as_mut(), out, inn) else {
        return;
    };
    match ev {
        PadEvent::Out(Ok(f)) => {
            c.fetching = false;
            let keys = f.ids.len() as u64;
            let start = send.install(f.pad);
            tracing::debug!(
                start,
                keys,
                request = %f.request,
                "otp: sending pad segment from the KME (enc_keys request ID)"
            );
            let a = c.ann_out.encode(&otp::Announce {
                start,
                key_bytes: f.key_bytes,
                ids: f.ids,
            });
            let far = *far.borrow();
            if let Some(far) = far {
                let _ = wire_rtp.send_to(&a, far).await;
            }
            c.latest = Some(a.clone());
            c.repeats.push((a, ANNOUNCE_REPEATS));
            if let Ok(mut s) = stats.lock() {
                s.pad_keys += keys;
                s.pad_bytes = send.pad_bytes + recv.pad_bytes;
                if f.stock_bits.is_some() {
                    s.stock_bits = f.stock_bits;
                }
            }
        }
        PadEvent::Out(Err(e)) => {
            c.fetching = false;
            c.retry_at = Instant::now() + Duration::from_secs(1);
            tracing::warn!(
                "otp: no sending pad from the KME (packets are dropped until it comes): {e}"
            );
        }
        PadEvent::In(start, keys, Ok(p)) => {
            recv.install(start, p);
            if let Ok(mut s) = stats.lock() {
                s.pad_keys += keys;
                s.pad_bytes = send.pad_bytes + recv.pad_bytes;
            }
            // Packets that waited for this pad (or for too long) now.
            let now = Instant::now();
            let mut keep = std::collections::VecDeque::new();
            while let Some((t, rtcp, mut p)) = c.held.pop_front() {
                if !recv.pad_here(&p) && now.duration_since(t) < otp::HOLD {
                    keep.push_back((t, rtcp, p));
                    continue;
                }
                let ua_addr = *ua.borrow();
                if recv.open(&mut p).is_ok() {
                    if let Some(ua) = ua_addr {
                        let (to, sock) = if rtcp {
                            (plus_one(ua), ua_rtcp)
                        } else {
                            (ua, ua_rtp)
                        };
                        let _ = sock.send_to(&p, to).await;
                    }
                }
            }
            c.held = keep;
            if let Ok(mut s) = stats.lock() {
                s.received = recv.passed;
                s.auth = recv.dropped.auth;
                s.replay = recv.dropped.replay;
            }
        }
        PadEvent::In(start, _, Err(e)) => {
            recv.unwant(start);
            tracing::warn!(
                start,
                "otp: the far edge's pad segment could not be fetched: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_sae_header_verifies_only_under_its_session_and_direction() {
        let k = qkdnet_media::Key256::new([4; 32]);
        let h = sae_header(&k, Direction::CallerToCallee, "sae-alice");
        assert_eq!(
            checked_sae(&k, Direction::CallerToCallee, &h).as_deref(),
            Some("sae-alice")
        );
        assert_eq!(checked_sae(&k, Direction::CalleeToCaller, &h), None);
        let other = qkdnet_media::Key256::new([5; 32]);
        assert_eq!(checked_sae(&other, Direction::CallerToCallee, &h), None);
        let swapped = h.replace("sae-alice", "sae-mallory");
        assert_eq!(checked_sae(&k, Direction::CallerToCallee, &swapped), None);
        for bad in [
            "",
            "sae-alice",
            "sae-alice;mac=",
            "sae-alice;mac=zz",
            ";mac=00",
        ] {
            assert_eq!(
                checked_sae(&k, Direction::CallerToCallee, bad),
                None,
                "{bad}"
            );
        }
    }
}
