//! Quantum secret calls between two unmodified baresip softphones (Debian's
//! `baresip-core`, installed by scripts/test.sh), each behind its own
//! `qkdnet call edge`, keyed by a `qkdnet keyservice serve` process.
//!
//! The media are charged straight into the service's store and the medium
//! files with the same keys (no QKD network in this test, so session keys
//! come from the service's CSPRNG and the report says so); the edges, the
//! service and the softphones are real processes talking SIP, RTP and the key
//! service protocol over loopback. baresip is driven through its `ctrl_tcp`
//! module (netstring JSON): A dials B through the edges, plays a WAV with
//! `aufile` and hangs up at its end; B auto-answers and records with
//! `sndfile`; the recording must match the WAV (normalised correlation ≥ 0.9
//! at the best lag).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qkdnet_crypto::SecretBytes;
use qkdnet_keyservice::sqlite::SqliteStore;
use qkdnet_keyservice::store::direct_offer;
use qkdnet_kms::store::MasterKey;
use qkdnet_media::proto::Identity;
use qkdnet_media::{ChargeRecord, FileMedium, Key256, Medium, MediumSpec};

#[path = "apps_common/mod.rs"]
mod apps_common;

const BIN: &str = env!("CARGO_BIN_EXE_qkdnet");
const PIN: &str = "482916";
const DOMAIN: &str = "qkd.test";
const RATE: u32 = 8_000;

/// Children killed when the test ends, however it ends.
struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (name, c) in &mut self.0 {
            if name == "kamailio" {
                // SIGTERM: the main process takes its worker children along.
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
                let _ = c.wait();
                continue;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port `p` with `p` and `p + 1` free for UDP and TCP on loopback, below
/// the kernel's ephemeral range (32768 and up by default), so that no
/// socket bound to port 0 meanwhile — a relay leg, a TLS client, another
/// test's softphone — can take it before the process it is meant for binds
/// it.
fn free_port_pair() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = 20_000 + 2 * ((seed.wrapping_add(n.wrapping_mul(7_919))) % 6_000) as u16;
        let ok = UdpSocket::bind(("127.0.0.1", p)).is_ok()
            && UdpSocket::bind(("127.0.0.1", p + 1)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok();
        if ok {
            return p;
        }
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn write_wav(path: &Path, samples: &[i16]) {
    let data_len = (samples.len() * 2) as u32;
    let mut b = Vec::with_capacity(44 + samples.len() * 2);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&RATE.to_le_bytes());
    b.extend_from_slice(&(RATE * 2).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        b.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, b).expect("write wav");
}

/// The 16-bit mono samples of a PCM WAV file (chunks walked, not assumed).
fn read_wav(path: &Path) -> Vec<i16> {
    let b = std::fs::read(path).expect("read wav");
    assert!(
        b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WAVE",
        "{path:?} is not a WAV"
    );
    let mut at = 12;
    while at + 8 <= b.len() {
        let id = &b[at..at + 4];
        let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().expect("4")) as usize;
        let body = &b[at + 8..(at + 8 + len).min(b.len())];
        if id == b"data" {
            return body
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]))
                .collect();
        }
        at += 8 + len + (len & 1);
    }
    Vec::new()
}

/// Speech-like test signal: a gliding tone with two formant-like partials,
/// syllable-rate amplitude modulation and pauses, so a wrong alignment
/// cannot correlate.
fn test_signal(seconds: f64) -> Vec<i16> {
    let n = (seconds * f64::from(RATE)) as usize;
    let mut phase = [0f64; 3];
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(RATE);
            let f0 = 140.0 + 60.0 * (2.0 * std::f64::consts::PI * 0.7 * t).sin();
            let freqs = [f0, 3.1 * f0 + 200.0, 7.3 * f0 + 500.0];
            let mut v = 0.0;
            for (k, f) in freqs.iter().enumerate() {
                phase[k] += 2.0 * std::f64::consts::PI * f / f64::from(RATE);
                v += [0.6, 0.3, 0.15][k] * phase[k].sin();
            }
            let syllable = (2.0 * std::f64::consts::PI * 3.3 * t).sin().max(0.0);
            let pause = if (t * 1.3).fract() < 0.2 { 0.0 } else { 1.0 };
            (v * syllable * pause * 12_000.0) as i16
        })
        .collect()
}

/// Normalised cross-correlation of `rec` against `reference` at the best lag
/// in `0..max_lag` (the recording may start late, never early).
fn best_correlation(reference: &[i16], rec: &[i16], max_lag: usize) -> (usize, f64) {
    let mut best = (0, f64::MIN);
    for lag in 0..max_lag.min(rec.len()) {
        let n = reference.len().min(rec.len() - lag);
        if n < RATE as usize {
            break;
        }
        let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
        for i in 0..n {
            let x = f64::from(reference[i]);
            let y = f64::from(rec[lag + i]);
            xy += x * y;
            xx += x * x;
            yy += y * y;
        }
        let c = xy / (xx.sqrt() * yy.sqrt()).max(1.0);
        if c > best.1 {
            best = (lag, c);
        }
    }
    best
}

/// A baresip `ctrl_tcp` connection (netstring-framed JSON both ways).
struct Ctrl {
    stream: TcpStream,
    buf: Vec<u8>,
    log: Vec<serde_json::Value>,
}

impl Ctrl {
    fn connect(port: u16) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_millis(200)))
                        .expect("timeout");
                    return Self {
                        stream,
                        buf: Vec::new(),
                        log: Vec::new(),
                    };
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("baresip ctrl_tcp on {port}: {e}"),
            }
        }
    }

    fn command(&mut self, command: &str, params: &str) {
        let body =
            serde_json::json!({"command": command, "params": params, "token": command}).to_string();
        self.stream
            .write_all(format!("{}:{body},", body.len()).as_bytes())
            .expect("ctrl write");
    }

    /// Reads messages until `pred` matches one or `secs` pass.
    fn wait_for(
        &mut self,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            while let Some(colon) = self.buf.iter().position(|&b| b == b':') {
                let Ok(n) = std::str::from_utf8(&self.buf[..colon])
                    .unwrap_or("x")
                    .parse::<usize>()
                else {
                    panic!("bad netstring from baresip");
                };
                if self.buf.len() < colon + 2 + n {
                    break;
                }
                let v: serde_json::Value =
                    serde_json::from_slice(&self.buf[colon + 1..colon + 1 + n]).expect("json");
                self.buf.drain(..colon + 2 + n);
                self.log.push(v.clone());
                if pred(&v) {
                    return Some(v);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => {}
            }
        }
    }
}

fn event(v: &serde_json::Value, ty: &str) -> bool {
    v["event"] == true && v["type"] == ty
}

struct Phone {
    dir: PathBuf,
    sip: u16,
    ctrl: u16,
    rec: PathBuf,
}

fn baresip_config(
    dir: &Path,
    name: &str,
    registrar: bool,
    edge: SocketAddr,
    source: &Path,
    answer: &str,
    mode: &str,
) -> Phone {
    let sip = free_port_pair();
    let ctrl = free_port_pair();
    let rtp = free_port_pair();
    let rec = dir.join(format!("rec-{name}"));
    let conf = dir.join(format!("baresip-{name}"));
    std::fs::create_dir_all(&rec).expect("mkdir");
    std::fs::create_dir_all(&conf).expect("mkdir");
    let config = format!(
        "poll_method epoll
sip_listen 127.0.0.1:{sip}
call_local_timeout 120
call_max_calls 4
audio_buffer 20-160
audio_path /usr/share/baresip
audio_player aubridge,sink{name}
audio_source aufile,{}
audio_alert aubridge,sink{name}
ausrc_format s16
auplay_format s16
auenc_format s16
audec_format s16
rtp_ports {rtp}-{}
rtcp_mux no
jitter_buffer_delay 5-10
net_interface 127.0.0.1
module_path /usr/lib/baresip/modules
module g711.so
module aufile.so
module aubridge.so
module sndfile.so
module srtp.so
module_tmp uuid.so
module_tmp account.so
module_app contact.so
module_app menu.so
module_app ctrl_tcp.so
ctrl_tcp_listen 127.0.0.1:{ctrl}
snd_path {}
statmode_default off
",
        source.display(),
        rtp + 9,
        rec.display()
    );
    std::fs::write(conf.join("config"), config).expect("config");
    std::fs::write(
        conf.join("accounts"),
        format!(
            "<sip:{name}@{}>;regint={};audio_codecs=PCMU;answermode={answer};outbound=\"sip:{edge}\"{}\n",
            if registrar { DOMAIN.to_owned() } else { format!("127.0.0.1:{sip}") },
            if registrar { 60 } else { 0 },
            if mode == "srtp" { ";mediaenc=srtp-mand" } else { "" }
        ),
    )
    .expect("accounts");
    std::fs::write(conf.join("contacts"), "").expect("contacts");
    Phone {
        dir: conf,
        sip,
        ctrl,
        rec,
    }
}

fn spawn(procs: &mut Procs, name: &str, cmd: &mut Command, log: &Path) {
    let out = std::fs::File::create(log).expect("log");
    let err = out.try_clone().expect("log");
    let child = cmd
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    procs.0.push((name.to_owned(), child));
}

/// A subscriber's medium as the test made it (the test keeps the keys, as a
/// lab would, to check what the service issued).
struct Charged {
    path: PathBuf,
    id: uuid::Uuid,
    identity: Identity,
    keys: Vec<Key256>,
}

/// Creates a medium file for `owner` with `n` keys and charges the same keys
/// into the key service's store.
fn charged_medium(store: &mut SqliteStore, dir: &Path, owner: &str, n: u64) -> Charged {
    let path = dir.join(format!("{}.medium", owner.replace([':', '@', '.'], "_")));
    let identity = Identity::new(owner.to_owned()).expect("identity");
    store.enrol(&identity, owner, 0).expect("enrol");
    let mut m = FileMedium::create(
        &path,
        &MediumSpec::new(owner, n),
        &SecretBytes::from_slice(PIN.as_bytes()),
    )
    .expect("medium");
    let keys: Vec<Key256> = (0..n)
        .map(|_| {
            let mut k = [0u8; 32];
            getrandom::fill(&mut k).expect("random");
            Key256::new(k)
        })
        .collect();
    // Offers hold at most 256 keys.
    for (i, chunk) in keys.chunks(256).enumerate() {
        let offer = direct_offer(m.id(), &identity, (i * 256) as u64, chunk.len()).expect("offer");
        store
            .charge(&offer, chunk, 0)
            .expect("store")
            .expect("charge accepted");
    }
    m.charge(&keys, ChargeRecord::new("test", 0).expect("record"))
        .expect("medium charge");
    Charged {
        path,
        id: m.id(),
        identity,
        keys,
    }
}

/// The key service as a process, and a charged medium for each subscriber.
struct KeyService {
    port: u16,
    addr: String,
    master: PathBuf,
    db: PathBuf,
    media: Vec<Charged>,
}

/// Starts `qkdnet keyservice serve` on a store where each of `users`
/// (`sip:USER@DOMAIN`) is enrolled with a medium charged with `keys` keys.
fn start_key_service(dir: &Path, procs: &mut Procs, users: &[&str], keys: u64) -> KeyService {
    let master = dir.join("ks.key");
    MasterKey::create_file(&master).expect("master key");
    let db = dir.join("ks.db");
    let media = {
        let mut store =
            SqliteStore::open(&db, &MasterKey::read_file(&master).expect("read")).expect("store");
        users
            .iter()
            .map(|u| charged_medium(&mut store, dir, &format!("sip:{u}@{DOMAIN}"), keys))
            .collect()
    };
    let port = free_port_pair();
    let addr = format!("127.0.0.1:{port}");
    spawn(
        procs,
        "keyservice",
        Command::new(BIN)
            .args(["keyservice", "serve", "--store"])
            .arg(&db)
            .arg("--master-key")
            .arg(&master)
            .args(["--listen", &addr]),
        &dir.join("keyservice.log"),
    );
    KeyService {
        port,
        addr,
        master,
        db,
        media,
    }
}

/// Spawns `qkdnet call edge` as `name` (log `DIR/NAME.log`) for the softphone
/// on loopback port `ua`; `quiet` logs warnings only (load runs).
#[allow(clippy::too_many_arguments)]
fn spawn_edge(
    procs: &mut Procs,
    dir: &Path,
    name: &str,
    listen: SocketAddr,
    ua: u16,
    ks: &str,
    medium: &Path,
    mode: &str,
    registrar: Option<SocketAddr>,
    quiet: bool,
    extra: &[String],
) {
    let mut cmd = Command::new(BIN);
    cmd.args(["call", "edge", "--medium"])
        .arg(medium)
        .args([
            "--listen",
            &listen.to_string(),
            "--ua",
            &format!("127.0.0.1:{ua}"),
        ])
        .args(["--keyservice", ks, "--domain", DOMAIN, "--mode", mode])
        .env("QKDNET_MEDIA_PIN", PIN);
    if let Some(r) = registrar {
        cmd.args(["--registrar", &r.to_string()]);
    }
    if quiet {
        cmd.env("QKDNET_LOG", "warn");
    } else if mode == "otp" {
        // The sending pad's enc_keys request IDs are logged at debug: the
        // test asks the KME for the same keys again with them.
        cmd.env("QKDNET_LOG", "debug");
    }
    cmd.args(extra);
    spawn(procs, name, &mut cmd, &dir.join(format!("{name}.log")));
}

/// Waits until each edge printed its SIP address (the medium's PIN is
/// stretched with Argon2id first).
fn wait_for_edges(dir: &Path, names: &[&str]) {
    for name in names {
        let log = dir.join(format!("{name}.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("call edge: SIP on")
        {
            assert!(
                Instant::now() < deadline,
                "{name} did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The files `names` in `dir`, one after the other, for a failure message.
fn logs(dir: &Path, names: &[&str]) -> String {
    names
        .iter()
        .map(|f| {
            format!(
                "--- {f}\n{}\n",
                std::fs::read_to_string(dir.join(f)).unwrap_or_default()
            )
        })
        .collect()
}

fn reports(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("call_id").is_some())
        .collect()
}

/// Starts tcpdump on loopback (UDP, and the key service's TCP port) and
/// waits until it listens.
fn start_capture(dir: &Path, ks_port: u16) -> (Capture, PathBuf) {
    let pcap = dir.join(format!("call-{}.pcap", free_tcp_port()));
    let log = pcap.with_extension("log");
    let child = Command::new("tcpdump")
        .args(["-i", "lo", "-U", "-n", "-s", "0", "-w"])
        .arg(&pcap)
        .args(["udp or tcp port", &ks_port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
        .spawn()
        .expect("tcpdump (Debian package tcpdump)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(Instant::now() < deadline, "tcpdump did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Capture(Some(child)), pcap)
}

/// A running tcpdump, stopped when dropped (also when a test fails).
struct Capture(Option<Child>);

impl Drop for Capture {
    fn drop(&mut self) {
        stop_capture(self);
    }
}

/// SIGINT: tcpdump flushes and closes the file.
fn stop_capture(c: &mut Capture) {
    if let Some(mut child) = c.0.take() {
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
}

/// The relay addresses of A's and B's edge toward each other, from the SDP
/// of the INVITE and of its 200 OK between the edges.
fn wire_legs(
    cap: &[Packet],
    edge_a: SocketAddr,
    edge_b: SocketAddr,
) -> Option<(SocketAddr, SocketAddr)> {
    let (mut a, mut b) = (None, None);
    for p in cap.iter().filter(|p| !p.tcp) {
        let Ok(msg) = qkdnet_call::sip::parse(&p.payload) else {
            continue;
        };
        if msg.method() != Some("INVITE") {
            continue;
        }
        if p.src == edge_a && p.dst == edge_b && msg.code().is_none() {
            a = qkdnet_call::sdp::audio(&msg.body).ok().map(|x| x.rtp);
        }
        if p.src == edge_b && p.dst == edge_a && msg.code() == Some(200) {
            b = qkdnet_call::sdp::audio(&msg.body).ok().map(|x| x.rtp);
        }
    }
    Some((a?, b?))
}

/// One packet of a capture: transport, addresses, payload.
struct Packet {
    tcp: bool,
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

/// The IPv4 TCP/UDP packets of a pcap file (Ethernet link type, as tcpdump
/// writes for `lo`).
fn read_pcap(path: &Path) -> Vec<Packet> {
    let b = std::fs::read(path).expect("pcap");
    assert!(b.len() >= 24, "empty capture");
    let le = b[..4] == [0xd4, 0xc3, 0xb2, 0xa1];
    let u32_at = |at: usize| {
        let w: [u8; 4] = b[at..at + 4].try_into().expect("4");
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    assert_eq!(u32_at(20), 1, "not an Ethernet capture");
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= b.len() {
        let len = u32_at(at + 8) as usize;
        let frame = &b[at + 16..(at + 16 + len).min(b.len())];
        at += 16 + len;
        if frame.len() < 14 + 20 || frame[12..14] != [8, 0] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let proto = ip[9];
        let addr = |o: usize| std::net::Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
        let (sa, da) = (addr(12), addr(16));
        let l4 = &ip[ihl..total];
        let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
        let (tcp, payload) = match proto {
            17 if l4.len() >= 8 => (false, &l4[8..]),
            6 if l4.len() >= 20 => (true, &l4[usize::from(l4[12] >> 4) * 4..]),
            _ => continue,
        };
        out.push(Packet {
            tcp,
            src: SocketAddr::new(sa.into(), port(0)),
            dst: SocketAddr::new(da.into(), port(2)),
            payload: payload.to_vec(),
        });
    }
    out
}

/// The session key the key service issued first (by its terminal's port),
/// recovered from the captured key service traffic with a subscriber's own
/// medium keys (the grant is wrapped under the key at its `wrap_index`).
fn issued_key(cap: &[Packet], ks: SocketAddr, who: &Charged) -> Option<Key256> {
    issued_keys(cap, ks, who).into_iter().next()
}

/// Every session key the key service issued to `who` in the capture.
fn issued_keys(cap: &[Packet], ks: SocketAddr, who: &Charged) -> Vec<Key256> {
    let mut keys = Vec::new();
    use qkdnet_media::proto::{GrantExpect, Message, frame_len, open_grant};
    let mut flows: std::collections::BTreeMap<SocketAddr, Vec<u8>> = Default::default();
    for p in cap.iter().filter(|p| p.tcp && p.src == ks) {
        flows
            .entry(p.dst)
            .or_default()
            .extend_from_slice(&p.payload);
    }
    for stream in flows.values() {
        let mut at = 0;
        while let Ok(Some(n)) = frame_len(&stream[at..]) {
            if at + n > stream.len() {
                break;
            }
            if let Ok(Message::SessionKeyGrant(g)) = Message::decode(&stream[at..at + n]) {
                let Some(k) = who.keys.get(g.wrap_index as usize) else {
                    break;
                };
                let expect = GrantExpect {
                    medium_id: who.id,
                    me: &who.identity,
                    session_id: g.session_id,
                };
                if let Ok(sk) = open_grant(&g, &expect, g.wrap_index, k) {
                    keys.push(sk.key);
                }
            }
            at += n;
        }
    }
    keys
}

/// μ-law (G.711 PCMU) to linear.
fn ulaw(b: u8) -> i16 {
    let b = !b;
    let t = ((i32::from(b & 0x0f) << 3) + 0x84) << ((b & 0x70) >> 4);
    (if b & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
}

#[test]
fn two_baresip_phones_talk_through_srtp_edges_keyed_by_the_key_service() {
    call_in_mode("srtp");
}

/// `otp`: the edges are SAEs of a two-KME network; each direction's media
/// are one-time-padded with QKD keys its edge took from its KME; the
/// capture opens with those keys (asked again from the KME with the edge's
/// request IDs) and with no others.
#[test]
fn two_baresip_phones_talk_through_otp_edges_padded_from_the_kmes() {
    call_in_mode("otp");
}

#[test]
fn two_baresip_phones_talk_through_sm4_edges_keyed_by_the_key_service() {
    call_in_mode("sm4");
}

/// `sm4` with the caller's edge moving the call to a new session key every
/// second: B still hears A whole, both edges count the rekeys, and the
/// capture opens only with the keys the service issued — more than one.
#[test]
fn an_sm4_call_rekeyed_every_second_loses_nothing() {
    call_in_mode_with("sm4", &["--rekey-seconds", "1"]);
}

/// Everything a call needs, running: the key service, two edges, two phones.
struct Rig {
    tmp: tempfile::TempDir,
    procs: Procs,
    ks_port: u16,
    ks: String,
    master: PathBuf,
    db: PathBuf,
    edge_a: SocketAddr,
    edge_b: SocketAddr,
    a: Phone,
    b: Phone,
    alice: Charged,
    bob: Charged,
    speech: Vec<i16>,
    tone: Vec<i16>,
    ca: Ctrl,
    cb: Ctrl,
    /// `otp`: the two KMEs the edges' SAEs (alice, bob) belong to, served
    /// in this process (declared last: dropped after the edges).
    kmes: Option<Kmes>,
}

/// Two KMEs with seeded test keys, run by their own runtime.
struct Kmes {
    net: apps_common::Net,
    rt: tokio::runtime::Runtime,
}

fn rig(mode: &str) -> Rig {
    rig_with(mode, false)
}

/// With `registrar`, a kamailio (deploy/kamailio.cfg) the phones register
/// with through their edges, so callers dial sip:bob@DOMAIN.
fn rig_with(mode: &str, registrar: bool) -> Rig {
    rig_opts(mode, registrar, 64, &[])
}

/// `otp`: `kme_blocks` seeded blocks of 8 KiB per KME (half each way);
/// `edge_args`: more arguments for both edges.
fn rig_opts(mode: &str, registrar: bool, kme_blocks: u64, edge_args: &[&str]) -> Rig {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let mut procs = Procs(Vec::new());
    let kamailio: Option<SocketAddr> = registrar.then(|| {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port_pair())
            .parse()
            .expect("addr");
        let cfg =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kamailio.cfg"))
                .expect("deploy/kamailio.cfg")
                .replace("@LISTEN@", &format!("udp:{addr}"))
                .replace("@DOMAIN@", DOMAIN);
        std::fs::write(dir.join("kamailio.cfg"), cfg).expect("cfg");
        spawn(
            &mut procs,
            "kamailio",
            Command::new("kamailio")
                .args(["-DD", "-E", "-f"])
                .arg(dir.join("kamailio.cfg"))
                .arg("-Y")
                .arg(dir),
            &dir.join("kamailio.log"),
        );
        addr
    });

    // The key service with two subscribers and their media.
    let KeyService {
        port: ks_port,
        addr: ks,
        master,
        db,
        media,
    } = start_key_service(dir, &mut procs, &["alice", "bob"], 16);
    let [alice_medium, bob_medium]: [Charged; 2] = media.try_into().ok().expect("two media");

    // otp: the edges are SAEs alice and bob of a two-KME network (seeded test
    // keys: 8 KiB blocks).
    let kmes = (mode == "otp").then(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let net = rt.block_on(apps_common::Net::start_with(kme_blocks, 8192));
        Kmes { net, rt }
    });

    // Sounds: A speaks the test signal; B sends a long tone (so its own file
    // never ends the call first).
    let speech = test_signal(4.0);
    write_wav(&dir.join("speech.wav"), &speech);
    let tone: Vec<i16> = (0..(60 * RATE))
        .map(|i| {
            ((i as f64 * 2.0 * std::f64::consts::PI * 1000.0 / f64::from(RATE)).sin() * 8000.0)
                as i16
        })
        .collect();
    write_wav(&dir.join("tone.wav"), &tone);

    // Two edges, then the phones behind them.
    let edge_a: SocketAddr = format!("127.0.0.1:{}", free_port_pair())
        .parse()
        .expect("addr");
    let edge_b: SocketAddr = format!("127.0.0.1:{}", free_port_pair())
        .parse()
        .expect("addr");
    let a = baresip_config(
        dir,
        "alice",
        registrar,
        edge_a,
        &dir.join("speech.wav"),
        "manual",
        mode,
    );
    let b = baresip_config(
        dir,
        "bob",
        registrar,
        edge_b,
        &dir.join("tone.wav"),
        "auto",
        mode,
    );
    // A's contact (for `message`) is Bob behind his edge.
    std::fs::write(
        a.dir.join("contacts"),
        format!("\"Bob\" <sip:bob@{edge_b}>\n"),
    )
    .expect("contacts");
    for (name, sae, edge, phone, medium) in [
        ("edge-a", "alice", edge_a, &a, &alice_medium.path),
        ("edge-b", "bob", edge_b, &b, &bob_medium.path),
    ] {
        let mut extra: Vec<String> = match &kmes {
            Some(k) => vec![
                "--connect".into(),
                k.net.path("connect.json").to_string_lossy().into_owned(),
                "--as".into(),
                sae.into(),
            ],
            None => Vec::new(),
        };
        extra.extend(edge_args.iter().map(|a| (*a).to_owned()));
        spawn_edge(
            &mut procs, dir, name, edge, phone.sip, &ks, medium, mode, kamailio, false, &extra,
        );
    }
    for (name, phone) in [("alice", &a), ("bob", &b)] {
        spawn(
            &mut procs,
            name,
            // Line-buffered, so what baresip prints (an incoming MESSAGE) reaches its
            // log while it runs.
            Command::new("stdbuf")
                .args(["-oL", "-eL", "baresip", "-f"])
                .arg(&phone.dir),
            &dir.join(format!("baresip-{name}.log")),
        );
    }
    wait_for_edges(dir, &["edge-a", "edge-b"]);
    let ca = Ctrl::connect(a.ctrl);
    let cb = Ctrl::connect(b.ctrl);
    Rig {
        tmp,
        procs,
        ks_port,
        ks,
        master,
        db,
        edge_a,
        edge_b,
        a,
        b,
        alice: alice_medium,
        bob: bob_medium,
        speech,
        tone,
        ca,
        cb,
        kmes,
    }
}

/// A calls B through the edges in `mode`; B hears A; both edges report one
/// keyed session.
fn call_in_mode(mode: &str) {
    call_in_mode_with(mode, &[]);
}

fn call_in_mode_with(mode: &str, edge_args: &[&str]) {
    let rekeying = !edge_args.is_empty();
    let Rig {
        tmp,
        procs: _procs,
        ks_port,
        ks,
        master: _,
        db: _,
        edge_a,
        edge_b,
        a,
        b,
        alice: alice_medium,
        bob: bob_medium,
        speech,
        tone,
        mut ca,
        mut cb,
        kmes,
    } = rig_opts(mode, false, 64, edge_args);
    let dir = tmp.path();

    // Capture everything on loopback for the length of the call.
    let (mut tcpdump, pcap) = start_capture(dir, ks_port);

    ca.command("dial", &format!("sip:bob@{edge_b}"));
    let established = ca.wait_for(20, |v| {
        event(v, "CALL_ESTABLISHED") || event(v, "CALL_CLOSED")
    });
    let dump = |dir: &Path| {
        logs(
            dir,
            &[
                "edge-a.log",
                "edge-b.log",
                "keyservice.log",
                "baresip-alice.log",
                "baresip-bob.log",
            ],
        )
    };
    assert!(
        established
            .as_ref()
            .is_some_and(|v| event(v, "CALL_ESTABLISHED")),
        "the call was not established: {established:?}\n{}",
        dump(dir)
    );
    // A's file ends after 4 s; baresip then hangs up by itself.
    let closed = ca.wait_for(30, |v| event(v, "CALL_CLOSED"));
    assert!(closed.is_some(), "the call did not end:\n{}", dump(dir));
    assert!(
        cb.wait_for(10, |v| event(v, "CALL_CLOSED")).is_some(),
        "B did not see the call end"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop_capture(&mut tcpdump);
    check_capture(
        &read_pcap(&pcap),
        mode,
        ks.parse().expect("addr"),
        edge_a,
        edge_b,
        &alice_medium,
        &bob_medium,
        &speech,
        kmes.as_ref().map(|k| (k, dir.join("edge-a.log"))).as_ref(),
    );

    // B heard A.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rec = loop {
        let found = std::fs::read_dir(&b.rec)
            .expect("rec dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.to_string_lossy().ends_with("-dec.wav"));
        if let Some(p) =
            found.filter(|p| std::fs::metadata(p).map(|m| m.len() > 44).unwrap_or(false))
        {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "B recorded nothing:\n{}",
            dump(dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(300)); // the header is finalised at close
    let heard = read_wav(&rec);
    let (lag, corr) = best_correlation(&speech, &heard, RATE as usize);
    eprintln!(
        "B heard {} samples; correlation with A's speech {corr:.4} at lag {lag}",
        heard.len()
    );
    assert!(
        corr >= 0.9,
        "B's recording does not match A's speech: correlation {corr:.3} at lag {lag} ({} samples heard)\n{}",
        heard.len(),
        dump(dir)
    );

    // And A heard B's tone (the other direction, other key).
    let a_rec = std::fs::read_dir(&a.rec)
        .expect("rec dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .expect("A recorded");
    let heard_a = read_wav(&a_rec);
    let (_, corr_a) = best_correlation(&tone[..RATE as usize * 3], &heard_a, 16);
    assert!(
        corr_a >= 0.9,
        "A's recording does not match B's tone: {corr_a:.3}"
    );

    // Both edges reported the call: same session, keyed, no drops.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (ra, rb) = loop {
        let (ra, rb) = (
            reports(&dir.join("edge-a.log")),
            reports(&dir.join("edge-b.log")),
        );
        if !ra.is_empty() && !rb.is_empty() {
            break (ra, rb);
        }
        assert!(Instant::now() < deadline, "no call reports:\n{}", dump(dir));
        std::thread::sleep(Duration::from_millis(100));
    };
    let (ra, rb) = (&ra[0], &rb[0]);
    eprintln!("caller edge: {ra}\ncallee edge: {rb}");
    assert_eq!(ra["role"], "caller");
    assert_eq!(rb["role"], "callee");
    assert_eq!(
        ra["session"], rb["session"],
        "one key-service session for both edges"
    );
    assert_eq!(ra["mode"], mode);
    assert_eq!(rb["mode"], mode);
    assert_eq!(ra["peer"], format!("sip:bob@{DOMAIN}"));
    assert_eq!(rb["peer"], format!("sip:alice@{DOMAIN}"));
    for r in [ra, rb] {
        assert!(r["sent"].as_u64().unwrap_or(0) > 100, "{r}");
        assert!(r["received"].as_u64().unwrap_or(0) > 100, "{r}");
        assert_eq!(r["dropped_auth"], 0, "{r}");
        if mode == "otp" {
            // Both directions' pad went through this edge's KME: keys of
            // 8192 bits, at least the pad the packets used.
            let keys = r["pad_keys"].as_u64().unwrap_or(0);
            assert!(keys >= 32, "{r}");
            assert_eq!(r["pad_bytes"].as_u64(), Some(keys * 1024), "{r}");
            assert!(r["pad_used_bytes"].as_u64().unwrap_or(0) > 100 * 176, "{r}");
            assert!(r["talk_seconds_left"].as_f64().is_some(), "{r}");
        } else {
            assert_eq!(r["pad_keys"], 0, "{r}");
        }
        let rekeys = r["rekeys"].as_u64().unwrap_or(0);
        if rekeying {
            assert!(rekeys >= 2, "a 4 s call rekeyed every second: {r}");
        } else {
            assert_eq!(rekeys, 0, "{r}");
        }
        assert_eq!(r["medium_keys"].as_u64(), Some(2 + 2 * rekeys), "{r}");
    }
    assert_eq!(ra["rekeys"], rb["rekeys"], "both edges moved together");
}

/// What the capture between the two edges must show: SIP without key
/// material, media only in protected form, opening with the key the service
/// issued (to either party) and with no other, and carrying A's voice.
#[allow(clippy::too_many_arguments)]
fn check_capture(
    cap: &[Packet],
    mode: &str,
    ks: SocketAddr,
    edge_a: SocketAddr,
    edge_b: SocketAddr,
    alice: &Charged,
    bob: &Charged,
    speech: &[i16],
    otp: Option<&(&Kmes, PathBuf)>,
) {
    use qkdnet_call::edge::srtp_master_key;
    use qkdnet_call::media::{Direction, Unprotect};
    use qkdnet_call::srtp;

    // The issued keys (one, or one per epoch of a rekeyed call), recovered
    // independently by each party's medium keys.
    let keys = issued_keys(cap, ks, alice);
    let keys_b = issued_keys(cap, ks, bob);
    assert!(!keys.is_empty(), "alice's grant in the capture");
    let sorted = |k: &[Key256]| {
        let mut v: Vec<[u8; 32]> = k.iter().map(|k| *k.expose_secret()).collect();
        v.sort_unstable();
        v
    };
    assert_eq!(sorted(&keys), sorted(&keys_b), "the same session keys");
    let key = issued_key(cap, ks, alice).expect("alice's first grant");

    // SIP between the edges: the session ID, never a key.
    let between =
        |p: &&Packet| (p.src == edge_a && p.dst == edge_b) || (p.src == edge_b && p.dst == edge_a);
    let sip: Vec<&Packet> = cap.iter().filter(|p| !p.tcp).filter(between).collect();
    assert!(
        sip.len() >= 4,
        "INVITE, 100, 200, ACK, BYE between the edges: {}",
        sip.len()
    );
    let tx = srtp_master_key(&key, Direction::CallerToCallee);
    let rx = srtp_master_key(&key, Direction::CalleeToCaller);
    let secrets = [tx.to_inline(), rx.to_inline()];
    let mut invite_sdp = None;
    let mut answer_sdp = None;
    for p in &sip {
        let text = String::from_utf8_lossy(&p.payload);
        assert!(
            !text.contains("a=crypto"),
            "a crypto line between the edges:\n{text}"
        );
        for sec in &secrets {
            assert!(
                !text.contains(sec.as_str()),
                "a media key between the edges"
            );
        }
        for k in &keys {
            assert!(
                !p.payload.windows(32).any(|w| w == k.expose_secret()),
                "a session key between the edges"
            );
        }
        let msg = qkdnet_call::sip::parse(&p.payload).expect("SIP between the edges parses");
        if msg.method() == Some("INVITE") && msg.code().is_none() {
            assert!(msg.header("X-QKD-Session").is_some());
            invite_sdp = Some(qkdnet_call::sdp::audio(&msg.body).expect("offer"));
        }
        if msg.method() == Some("INVITE") && msg.code() == Some(200) {
            answer_sdp = Some(qkdnet_call::sdp::audio(&msg.body).expect("answer"));
        }
    }
    let (a_wire, b_wire) = (
        invite_sdp.expect("the INVITE between the edges").rtp,
        answer_sdp.expect("the 200 OK between the edges").rtp,
    );

    // Media from A's edge to B's edge: every packet opens with the issued
    // key, none with another, and the plain payloads are A's voice.
    let media: Vec<&Packet> = cap
        .iter()
        .filter(|p| !p.tcp && p.dst == b_wire && p.src.port() == a_wire.port())
        .collect();
    assert!(
        media.len() > 100,
        "A→B media packets captured: {}",
        media.len()
    );
    let other = Key256::new([0x5a; 32]);
    // otp: the pad of A's sending direction, asked from A's KME again under
    // the request IDs A's edge logged (the KME replays an answered request
    // once), and the same pad with one bit changed.
    let (mut otp_rx, mut otp_wrong) = (
        qkdnet_call::otp::OtpRecv::new(),
        qkdnet_call::otp::OtpRecv::new(),
    );
    if let Some((k, log)) = otp {
        let log = std::fs::read_to_string(log).expect("edge-a log");
        let client = k.net.client("alice");
        let mut segments = 0;
        for line in log
            .lines()
            .filter(|l| l.contains("otp: sending pad segment"))
        {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .map(str::to_owned)
                    .unwrap_or_else(|| panic!("{name} in {line}"))
            };
            let start: u64 = field("start").parse().expect("start");
            let n: u64 = field("keys").parse().expect("keys");
            let req: uuid::Uuid = field("request").parse().expect("request ID");
            let keys =
                k.rt.block_on(client.enc_keys_idempotent("bob", n, Some(8192), req, 1))
                    .expect("the KME replays the edge's request");
            let mut pad = zeroize::Zeroizing::new(Vec::new());
            for key in &keys {
                pad.extend_from_slice(&key.material);
            }
            let mut wrong = pad.clone();
            wrong[0] ^= 1; // H of the first segment, else a mask byte
            otp_rx.install(start, pad);
            otp_wrong.install(start, wrong);
            segments += 1;
        }
        assert!(segments >= 1, "no pad segment logged:\n{log}");
    }
    let mut voice = Vec::new();
    let (mut ok, mut bad) = (0, 0);
    let mut srtp_rx = srtp::Context::new(&tx);
    let mut srtp_wrong = srtp::Context::new(&srtp_master_key(&other, Direction::CallerToCallee));
    let mut sm4_rx: Vec<Unprotect> = keys
        .iter()
        .map(|k| Unprotect::new(k, Direction::CallerToCallee))
        .collect();
    let mut sm4_wrong = Unprotect::new(&other, Direction::CallerToCallee);
    let mut announcements = 0;
    let mut rekey_messages = 0;
    let mut used = std::collections::BTreeSet::new();
    for p in media {
        if mode == "otp" && qkdnet_call::otp::is_announce(&p.payload) {
            announcements += 1;
            continue;
        }
        if mode == "sm4" && qkdnet_call::rekey::is_control(&p.payload) {
            rekey_messages += 1;
            continue;
        }
        let mut plain = p.payload.clone();
        let mut wrong = p.payload.clone();
        let (opened, wrong_opened) = match mode {
            "otp" => (
                otp_rx.open(&mut plain).is_ok(),
                otp_wrong.open(&mut wrong).is_ok(),
            ),
            "srtp" => (
                srtp_rx.unprotect_rtp(&mut plain).is_ok(),
                srtp_wrong.unprotect_rtp(&mut wrong).is_ok(),
            ),
            _ => {
                let i = sm4_rx.iter_mut().position(|rx| {
                    let mut c = plain.clone();
                    let ok = rx.open(&mut c).is_ok();
                    if ok {
                        plain = c;
                    }
                    ok
                });
                if let Some(i) = i {
                    used.insert(i);
                }
                (i.is_some(), sm4_wrong.open(&mut wrong).is_ok())
            }
        };
        assert!(!wrong_opened, "a packet opened under another key");
        if opened {
            ok += 1;
            assert_ne!(
                plain[12..],
                p.payload[12..plain.len()],
                "payload sent in the clear"
            );
            voice.extend(plain[12..].iter().map(|&b| ulaw(b)));
        } else {
            bad += 1;
        }
    }
    assert_eq!(
        bad, 0,
        "captured packets that do not open with the issued key"
    );
    assert!(ok > 100);
    if mode == "otp" {
        assert!(announcements >= 1, "no pad announcement on the media path");
    }
    if mode == "sm4" && keys.len() > 1 {
        assert!(rekey_messages >= 1, "no rekey offer on the media path");
        assert!(
            used.len() >= 2,
            "a rekeyed call's packets used {used:?} of {} keys",
            keys.len()
        );
    }
    let (_, corr) = best_correlation(speech, &voice, RATE as usize);
    assert!(
        corr >= 0.9,
        "the decrypted capture is not A's voice: {corr:.3}"
    );
}

/// The cases a user meets when something is wrong: a call that is not
/// quantum-keyed is refused at the callee's edge and never rings; forged and
/// replayed media are dropped and counted while the call goes on; a revoked
/// callee and a key service that is down make the call fail with a clear SIP
/// status — never a call in the clear.
#[test]
fn calls_fail_closed_and_bad_media_is_dropped_and_counted() {
    let Rig {
        tmp,
        mut procs,
        ks_port,
        ks,
        master,
        db,
        edge_a,
        edge_b,
        a: _,
        b,
        alice: _,
        bob,
        speech,
        tone: _,
        mut ca,
        mut cb,
        ..
    } = rig("srtp");
    let dir = tmp.path();

    // 1. A plain INVITE straight to B's edge (no session): 488, B never rings.
    let mallory = UdpSocket::bind("127.0.0.1:0").expect("bind");
    mallory
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let me = mallory.local_addr().expect("addr");
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    let invite = format!(
        "INVITE sip:bob@{edge_b} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKplain1;rport\r\nMax-Forwards: 70\r\nFrom: <sip:mallory@{DOMAIN}>;tag=m1\r\nTo: <sip:bob@{edge_b}>\r\nCall-ID: plain-call-1\r\nCSeq: 1 INVITE\r\nContact: <sip:mallory@{me}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    mallory.send_to(invite.as_bytes(), edge_b).expect("send");
    let mut buf = [0u8; 4096];
    let final_response = loop {
        let (n, _) = mallory
            .recv_from(&mut buf)
            .expect("an answer from B's edge");
        let msg = qkdnet_call::sip::parse(&buf[..n]).expect("SIP");
        if msg.code().is_some_and(|c| c >= 200) {
            break msg;
        }
    };
    assert_eq!(final_response.code(), Some(488));
    assert!(
        final_response
            .header("Warning")
            .is_some_and(|w| w.contains("not a quantum-keyed call")),
        "{final_response:?}"
    );
    assert!(
        cb.wait_for(1, |v| event(v, "CALL_INCOMING")).is_none(),
        "B rang for a call without a quantum key"
    );

    // 1b. A forged "response" with B's edge on top of its Via chain and a
    // victim below it: the edge sent no such request, so it sends nothing.
    let victim = UdpSocket::bind("127.0.0.1:0").expect("bind");
    victim
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let forged = format!(
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP {edge_b};branch=z9hG4bKforged0001;rport\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKvictim;rport\r\nFrom: <sip:x@{DOMAIN}>;tag=1\r\nTo: <sip:y@{DOMAIN}>;tag=2\r\nCall-ID: reflect-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 200\r\n\r\n{}",
        victim.local_addr().expect("addr"),
        "x".repeat(200)
    );
    mallory.send_to(forged.as_bytes(), edge_b).expect("send");
    assert!(
        victim.recv_from(&mut buf).is_err(),
        "B's edge reflected a forged response to a third party"
    );

    // 2. A real call; while it runs, forged and replayed packets reach B's edge.
    let (mut tcpdump, pcap) = start_capture(dir, ks_port);
    ca.command("dial", &format!("sip:bob@{edge_b}"));
    assert!(
        ca.wait_for(20, |v| event(v, "CALL_ESTABLISHED")).is_some(),
        "call not established"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let cap = read_pcap(&pcap);
    let (a_wire, b_wire) = wire_legs(&cap, edge_a, edge_b).expect("the edges' relay legs");
    let genuine = cap
        .iter()
        .rev()
        .find(|p| !p.tcp && p.src == a_wire && p.dst == b_wire)
        .expect("a media packet between the edges")
        .payload
        .clone();
    let attacker = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for _ in 0..3 {
        attacker.send_to(&genuine, b_wire).expect("replay");
    }
    for i in 0..5u16 {
        // Ahead of the window (else it is a replay) with a changed payload.
        let mut forged = genuine.clone();
        let seq = u16::from_be_bytes([forged[2], forged[3]]).wrapping_add(1000 + i);
        forged[2..4].copy_from_slice(&seq.to_be_bytes());
        forged[12 + usize::from(i) * 7] ^= 0x40;
        attacker.send_to(&forged, b_wire).expect("forge");
    }
    assert!(
        ca.wait_for(30, |v| event(v, "CALL_CLOSED")).is_some(),
        "call did not end"
    );
    assert!(cb.wait_for(10, |v| event(v, "CALL_CLOSED")).is_some());
    stop_capture(&mut tcpdump);
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        if let Some(r) = reports(&dir.join("edge-b.log")).pop() {
            break r;
        }
        assert!(Instant::now() < deadline, "no report from B's edge");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        report["dropped_replay"].as_u64().unwrap_or(0) >= 3,
        "{report}"
    );
    assert!(
        report["dropped_auth"].as_u64().unwrap_or(0) >= 5,
        "{report}"
    );
    // …and B still heard A.
    std::thread::sleep(Duration::from_millis(300));
    let rec = std::fs::read_dir(&b.rec)
        .expect("rec")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .expect("B recorded");
    let (_, corr) = best_correlation(&speech, &read_wav(&rec), RATE as usize);
    assert!(corr >= 0.9, "B's audio suffered from the attack: {corr:.3}");

    // 2b. B is busy (rejects the ringing call): A hears "busy", the edges
    // pass the refusal back and end the call.
    cb.command("answermode", "manual");
    let _ = cb.wait_for(5, |v| v["response"] == true);
    ca.command("dial", &format!("sip:bob@{edge_b}"));
    assert!(
        cb.wait_for(20, |v| event(v, "CALL_INCOMING")).is_some(),
        "B's phone did not ring"
    );
    cb.command("hangup", "");
    let closed = ca
        .wait_for(20, |v| {
            event(v, "CALL_CLOSED") || event(v, "CALL_ESTABLISHED")
        })
        .expect("an outcome");
    assert!(event(&closed, "CALL_CLOSED"), "a rejected call: {closed}");
    let why = closed["param"].as_str().unwrap_or("").to_owned();
    assert!(why.starts_with("486"), "A was told: {why}");
    cb.command("answermode", "auto");
    let _ = cb.wait_for(5, |v| v["response"] == true);

    // 3. B's medium is reported lost: calls to B fail with 503 and a reason.
    let out = Command::new(BIN)
        .args(["media", "revoke", "--store"])
        .arg(&db)
        .arg("--master-key")
        .arg(&master)
        .args(["--medium", &bob.id.to_string()])
        .output()
        .expect("qkdnet media revoke");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ca.command("dial", &format!("sip:bob@{edge_b}"));
    let closed = ca
        .wait_for(20, |v| {
            event(v, "CALL_CLOSED") || event(v, "CALL_ESTABLISHED")
        })
        .expect("an outcome");
    assert!(
        event(&closed, "CALL_CLOSED"),
        "a call to a revoked medium: {closed}"
    );
    assert!(
        closed["param"].as_str().unwrap_or("").contains("503"),
        "{closed}"
    );
    let log = std::fs::read_to_string(dir.join("edge-a.log")).unwrap_or_default();
    assert!(log.contains("no quantum key for this call"), "{log}");

    // 4. The key service is down: calls fail with 503, never in the clear.
    for (name, c) in &mut procs.0 {
        if name == "keyservice" {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    let _ = ks;
    std::thread::sleep(Duration::from_millis(1100)); // sndfile names by the second
    ca.command("dial", &format!("sip:bob@{edge_b}"));
    let closed = ca
        .wait_for(20, |v| {
            event(v, "CALL_CLOSED") || event(v, "CALL_ESTABLISHED")
        })
        .expect("an outcome");
    assert!(
        event(&closed, "CALL_CLOSED"),
        "a call without the key service: {closed}"
    );
    assert!(
        closed["param"].as_str().unwrap_or("").contains("503"),
        "{closed}"
    );
    assert!(
        cb.wait_for(1, |v| event(v, "CALL_INCOMING")).is_none(),
        "B rang without a key"
    );
}

/// `otp` with too little QKD key for a pad segment: the callee's edge
/// refuses the call with 503 and a reason before B's phone rings.
#[test]
fn an_otp_call_without_pad_is_refused() {
    // One 8 KiB block per KME: 4 KiB of key each way, a segment is 16 KiB.
    let Rig {
        tmp,
        procs: _procs,
        edge_b,
        mut ca,
        mut cb,
        kmes: _kmes,
        ..
    } = rig_opts("otp", false, 1, &[]);
    let dir = tmp.path();
    ca.command("dial", &format!("sip:bob@{edge_b}"));
    let closed = ca
        .wait_for(20, |v| {
            event(v, "CALL_CLOSED") || event(v, "CALL_ESTABLISHED")
        })
        .unwrap_or_else(|| {
            let files = [
                "edge-a.log",
                "edge-b.log",
                "baresip-alice.log",
                "baresip-bob.log",
            ];
            panic!("no outcome:\n{}", logs(dir, &files))
        });
    assert!(
        event(&closed, "CALL_CLOSED"),
        "an otp call without pad: {closed}"
    );
    assert!(
        closed["param"].as_str().unwrap_or("").contains("503"),
        "{closed}"
    );
    let log = std::fs::read_to_string(dir.join("edge-b.log")).unwrap_or_default();
    assert!(log.contains("no one-time pad for this call"), "{log}");
    assert!(
        cb.wait_for(1, |v| event(v, "CALL_INCOMING")).is_none(),
        "B rang without a pad"
    );
}

/// SIP MESSAGE between the same phones: sealed between the edges under a
/// session of its own, delivered in the clear to B's softphone only.
#[test]
fn a_sip_message_is_sealed_between_the_edges() {
    let Rig {
        tmp,
        procs: _procs,
        ks_port,
        edge_a,
        edge_b,
        b,
        mut ca,
        ..
    } = rig("srtp");
    let dir = tmp.path();
    let (mut tcpdump, pcap) = start_capture(dir, ks_port);
    let text = "Meet at the trusted node at nine";
    ca.command("contact_next", "");
    let _ = ca.wait_for(5, |v| v["response"] == true);
    ca.command("message", text);
    let answer = ca.wait_for(5, |v| v["response"] == true);
    assert!(
        answer.as_ref().is_some_and(|v| v["ok"] == true),
        "{answer:?}"
    );
    // baresip shows a message only to a UI module; what it received is on
    // the loopback between B's edge and B, and its 200 OK goes back to A.
    let b_sip: SocketAddr = format!("127.0.0.1:{}", b.sip).parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let cap = read_pcap(&pcap);
        let delivered = cap.iter().any(|p| {
            !p.tcp
                && p.src == edge_b
                && p.dst == b_sip
                && p.payload.windows(text.len()).any(|w| w == text.as_bytes())
        });
        let answered = cap.iter().any(|p| {
            !p.tcp
                && p.src == edge_a
                && qkdnet_call::sip::parse(&p.payload)
                    .is_ok_and(|m| m.method() == Some("MESSAGE") && m.code() == Some(200))
        });
        if delivered && answered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B did not get the message (delivered {delivered}, answered {answered}):\n{}\n{}",
            std::fs::read_to_string(dir.join("edge-a.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("edge-b.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop_capture(&mut tcpdump);
    let cap = read_pcap(&pcap);
    let between: Vec<&Packet> = cap
        .iter()
        .filter(|p| {
            !p.tcp && ((p.src == edge_a && p.dst == edge_b) || (p.src == edge_b && p.dst == edge_a))
        })
        .collect();
    let sealed = between
        .iter()
        .filter_map(|p| qkdnet_call::sip::parse(&p.payload).ok())
        .find(|m| m.method() == Some("MESSAGE") && m.code().is_none())
        .expect("the MESSAGE between the edges");
    assert_eq!(
        sealed.header("Content-Type"),
        Some(qkdnet_call::message::SEALED_TYPE)
    );
    assert!(sealed.header("X-QKD-Session").is_some());
    for p in &between {
        assert!(
            !p.payload.windows(text.len()).any(|w| w == text.as_bytes()),
            "the message text between the edges"
        );
    }
    assert!(
        between
            .iter()
            .filter_map(|p| qkdnet_call::sip::parse(&p.payload).ok())
            .any(|m| m.method() == Some("MESSAGE") && m.code() == Some(200)),
        "B's 200 OK came back through the edges"
    );
}

/// With a registrar (Debian's kamailio, configured by deploy/kamailio.cfg):
/// the phones register through their edges, A dials sip:bob@DOMAIN, the
/// registrar sends the call along the Path to B's edge, and B hears A.
#[test]
fn calls_through_kamailio_reach_the_subscriber_by_name() {
    let Rig {
        tmp,
        procs: _procs,
        b,
        speech,
        mut ca,
        mut cb,
        ..
    } = rig_with("srtp", true);
    let dir = tmp.path();
    // Asked, not awaited as an event: the REGISTER_OK event may come before
    // the test's control connection does (a race CI hit).
    for (c, who) in [(&mut ca, "alice"), (&mut cb, "bob")] {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        let registered = loop {
            c.command("reginfo", "");
            if let Some(v) = c.wait_for(2, |v| v["token"] == "reginfo") {
                last = v["data"].as_str().unwrap_or_default().to_owned();
                if last.contains("OK") {
                    break true;
                }
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            registered,
            "{who} did not register through its edge (reginfo: {last:?}):\n{}\n{}",
            std::fs::read_to_string(dir.join("kamailio.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join(if who == "alice" {
                "edge-a.log"
            } else {
                "edge-b.log"
            }))
            .unwrap_or_default()
        );
    }
    ca.command("dial", &format!("sip:bob@{DOMAIN}"));
    let established = ca.wait_for(20, |v| {
        event(v, "CALL_ESTABLISHED") || event(v, "CALL_CLOSED")
    });
    assert!(
        established
            .as_ref()
            .is_some_and(|v| event(v, "CALL_ESTABLISHED")),
        "{established:?}\n{}\n{}\n{}",
        std::fs::read_to_string(dir.join("kamailio.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("edge-a.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("edge-b.log")).unwrap_or_default()
    );
    assert!(
        ca.wait_for(30, |v| event(v, "CALL_CLOSED")).is_some(),
        "call did not end"
    );
    assert!(cb.wait_for(10, |v| event(v, "CALL_CLOSED")).is_some());
    let log = std::fs::read_to_string(dir.join("kamailio.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("INVITE to sip:bob@{DOMAIN}")),
        "the call did not pass the registrar:\n{log}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let rec = std::fs::read_dir(&b.rec)
        .expect("rec")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .expect("B recorded");
    let (_, corr) = best_correlation(&speech, &read_wav(&rec), RATE as usize);
    assert!(
        corr >= 0.9,
        "B's recording does not match A's speech: {corr:.3}"
    );
    let ra = reports(&dir.join("edge-a.log"));
    assert_eq!(
        ra.first().map(|r| r["peer"].clone()),
        Some(format!("sip:bob@{DOMAIN}").into())
    );
}

/// Percentile of a sorted slice.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs a SIPp caller to completion; returns the INVITE → 200 OK times (ms)
/// of its calls and its wall time.
fn sipp_uac(
    dir: &Path,
    target: SocketAddr,
    via: Option<SocketAddr>,
    port: u16,
    calls: u64,
    rate: u64,
    party: Option<(&str, &str)>,
) -> (Vec<f64>, f64) {
    std::fs::create_dir_all(dir).expect("dir");
    let mut cmd = Command::new("sipp");
    cmd.current_dir(dir).arg(target.to_string());
    match party {
        // (caller, callee): our load scenario, From the caller's name.
        Some((caller, callee)) => cmd
            .arg("-sf")
            .arg(Path::new(SIPP_SCENARIOS).join("uac_load.xml"))
            .args(["-key", "caller", caller, "-s", callee]),
        None => cmd.args(["-sn", "uac", "-s", "bob"]),
    };
    cmd.args([
        "-i",
        "127.0.0.1",
        "-nostdin",
        "-trace_rtt",
        "-rtt_freq",
        "1",
    ])
    .args([
        "-p",
        &port.to_string(),
        "-m",
        &calls.to_string(),
        "-r",
        &rate.to_string(),
    ])
    .args(["-timeout", "120s", "-timeout_error", "-trace_err"]);
    if let Some(v) = via {
        cmd.args(["-rsa", &v.to_string()]);
    }
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("sipp (Debian package sip-tester)");
    let secs = t.elapsed().as_secs_f64();
    let errors: String = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("_errors.log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        out.status.success(),
        "SIPp calls failed ({:?}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        errors.chars().take(4000).collect::<String>()
    );
    let mut rtt = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        if e.file_name().to_string_lossy().ends_with("_rtt.csv") {
            for line in std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .skip(1)
            {
                if let Some(v) = line
                    .split(';')
                    .nth(1)
                    .and_then(|v| v.trim().parse::<f64>().ok())
                {
                    rtt.push(v);
                }
            }
        }
    }
    rtt.sort_by(f64::total_cmp);
    (rtt, secs)
}

/// SIPp load through two edges and the key service (`sm4` mode; SIPp's
/// built-in caller and callee, no media). Also the same calls straight from
/// caller to callee, so the setup delay the edges and the key step add is
/// measured in one run. Bounded here (40 calls at 20/s); as a benchmark:
/// `QKDNET_CALL_LOAD_CALLS=2000 QKDNET_CALL_LOAD_RATE=200 cargo test --release --test call_baresip sipp -- --nocapture`
/// prints one JSON line; `QKDNET_CALL_LOAD_PAIRS=P` runs P subscriber pairs
/// (own media, edges and SIPp parties) at once, each at the rate.
#[test]
fn sipp_calls_through_the_edges_and_the_key_service() {
    let calls: u64 = std::env::var("QKDNET_CALL_LOAD_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let rate: u64 = std::env::var("QKDNET_CALL_LOAD_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let mut procs = Procs(Vec::new());
    let pairs: usize = std::env::var("QKDNET_CALL_LOAD_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .clamp(1, 16);
    let all = sipp_edge_pairs(dir, &mut procs, 2 * calls + 16, true, pairs);
    let uac_direct = free_port_pair();
    for (i, e) in all.iter().enumerate() {
        spawn(
            &mut procs,
            &format!("sipp-uas{i}"),
            Command::new("sipp")
                .current_dir(dir)
                .arg("-sf")
                .arg(Path::new(SIPP_SCENARIOS).join("uas_load.xml"))
                .args(["-i", "127.0.0.1", "-nostdin", "-p", &e.uas.to_string()]),
            &dir.join(format!("sipp-uas{i}.log")),
        );
    }
    let names: Vec<&str> = all
        .iter()
        .flat_map(|e| e.names.iter().map(String::as_str))
        .collect();
    wait_for_edges(dir, &names);
    let uas_addr: SocketAddr = format!("127.0.0.1:{}", all[0].uas).parse().expect("addr");
    let (direct, direct_s) = sipp_uac(
        &dir.join("direct"),
        uas_addr,
        None,
        uac_direct,
        calls,
        rate,
        None,
    );
    // Every pair's caller at once, each at `rate`.
    let t = Instant::now();
    let runs: Vec<(Vec<f64>, f64)> = std::thread::scope(|sc| {
        let handles: Vec<_> = all
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let d = dir.join(format!("edged{i}"));
                sc.spawn(move || {
                    sipp_uac(
                        &d,
                        e.edge_b,
                        Some(e.edge_a),
                        e.uac,
                        calls,
                        rate,
                        Some((&e.caller, &e.callee)),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sipp thread"))
            .collect()
    });
    let edged_s = t.elapsed().as_secs_f64();
    let mut edged: Vec<f64> = runs.into_iter().flat_map(|(r, _)| r).collect();
    edged.sort_by(f64::total_cmp);
    let total = calls * pairs as u64;
    assert_eq!(
        edged.len() as u64,
        total,
        "every call through the edges was set up"
    );
    let callers: Vec<PathBuf> = all
        .iter()
        .map(|e| dir.join(format!("{}.log", e.names[0])))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while callers.iter().map(|l| reports(l).len() as u64).sum::<u64>() < total {
        assert!(
            Instant::now() < deadline,
            "the callers' edges reported {} of {total} calls",
            callers.iter().map(|l| reports(l).len()).sum::<usize>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut key_ms: Vec<f64> = all
        .iter()
        .flat_map(|e| e.names.iter())
        .flat_map(|n| reports(&dir.join(format!("{n}.log"))))
        .filter_map(|r| r["key_ms"].as_f64())
        .collect();
    key_ms.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "bench": "call_load", "calls": total, "pairs": pairs, "rate_offered": rate * pairs as u64, "mode": "sm4",
            "calls_per_second_through_edges": total as f64 / edged_s,
            "setup_ms_direct_p50": percentile(&direct, 0.5), "setup_ms_direct_p99": percentile(&direct, 0.99),
            "setup_ms_edges_p50": percentile(&edged, 0.5), "setup_ms_edges_p99": percentile(&edged, 0.99),
            "key_step_ms_p50": percentile(&key_ms, 0.5), "key_step_ms_p99": percentile(&key_ms, 0.99),
            "direct_seconds": direct_s, "edges_seconds": edged_s,
        })
    );
}

/// Two edges in `sm4` mode for SIPp parties: the caller (`sipp`) at port
/// `uac`, the callee (`bob`) at port `uas`, media with `keys` keys each.
struct SippEdges {
    edge_a: SocketAddr,
    edge_b: SocketAddr,
    uac: u16,
    uas: u16,
    /// The subscribers: caller and callee (user parts).
    caller: String,
    callee: String,
    /// The edges' names (their logs: `DIR/NAME.log`).
    names: [String; 2],
}

fn sipp_edges(dir: &Path, procs: &mut Procs, keys: u64, quiet: bool) -> SippEdges {
    sipp_edge_pairs(dir, procs, keys, quiet, 1)
        .pop()
        .expect("one pair")
}

/// `pairs` caller/callee subscribers (`sipp`/`bob`, then `sipp1`/`bob1`, …),
/// each with its own media and edges, at one key service.
fn sipp_edge_pairs(
    dir: &Path,
    procs: &mut Procs,
    keys: u64,
    quiet: bool,
    pairs: usize,
) -> Vec<SippEdges> {
    let suffix = |i: usize| if i == 0 { String::new() } else { i.to_string() };
    let users: Vec<String> = (0..pairs)
        .flat_map(|i| [format!("sipp{}", suffix(i)), format!("bob{}", suffix(i))])
        .collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let KeyService {
        addr: ks, media, ..
    } = start_key_service(dir, procs, &names, keys);
    let edge = || -> SocketAddr {
        format!("127.0.0.1:{}", free_port_pair())
            .parse()
            .expect("addr")
    };
    media
        .chunks(2)
        .enumerate()
        .map(|(i, m)| {
            let (uac, uas) = (free_port_pair(), free_port_pair());
            let (edge_a, edge_b) = (edge(), edge());
            let names = [
                format!("edge-a{}", suffix(i)),
                format!("edge-b{}", suffix(i)),
            ];
            for (name, edge, ua, medium) in [
                (&names[0], edge_a, uac, &m[0].path),
                (&names[1], edge_b, uas, &m[1].path),
            ] {
                spawn_edge(
                    procs,
                    dir,
                    name,
                    edge,
                    ua,
                    &ks,
                    medium,
                    "sm4",
                    None,
                    quiet,
                    &[],
                );
            }
            SippEdges {
                edge_a,
                edge_b,
                uac,
                uas,
                caller: format!("sipp{}", suffix(i)),
                callee: format!("bob{}", suffix(i)),
                names,
            }
        })
        .collect()
}

impl SippEdges {
    /// SIPp as the callee with `tests/sipp/SCENARIO` (one call; its files in
    /// `DIR/uas`), then waits for the edges.
    fn callee(&self, procs: &mut Procs, dir: &Path, scenario: &str, extra: &[&str]) {
        let d = dir.join("uas");
        std::fs::create_dir_all(&d).expect("dir");
        spawn(
            procs,
            "sipp-uas",
            Command::new("sipp")
                .current_dir(&d)
                .arg("-sf")
                .arg(Path::new(SIPP_SCENARIOS).join(scenario))
                .args(["-i", "127.0.0.1", "-m", "1", "-nostdin", "-p"])
                .arg(self.uas.to_string())
                .args(extra),
            &dir.join("sipp-uas.log"),
        );
        wait_for_edges(dir, &["edge-a", "edge-b"]);
    }

    /// SIPp as the caller of `bob` with `tests/sipp/SCENARIO` through the
    /// edges (one call, messages traced; its files in `DIR/uac`).
    fn caller(&self, dir: &Path, scenario: &str) -> Command {
        let d = dir.join("uac");
        std::fs::create_dir_all(&d).expect("dir");
        let mut c = Command::new("sipp");
        c.current_dir(&d)
            .arg(self.edge_b.to_string())
            .arg("-sf")
            .arg(Path::new(SIPP_SCENARIOS).join(scenario))
            .args(["-s", "bob", "-i", "127.0.0.1", "-nostdin", "-m", "1"])
            .args([
                "-p",
                &self.uac.to_string(),
                "-rsa",
                &self.edge_a.to_string(),
            ])
            .args(["-timeout", "30s", "-timeout_error", "-trace_msg"]);
        c
    }
}

const SIPP_SCENARIOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sipp");

/// The SIP messages a SIPp process received, from its `-trace_msg` log.
fn sipp_received(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        if e.file_name().to_string_lossy().ends_with("_messages.log") {
            let log = std::fs::read_to_string(e.path()).unwrap_or_default();
            for chunk in log.split("-----------------------------------------------") {
                if let Some((_, msg)) = chunk.split_once("message received") {
                    out.push(msg.to_owned());
                }
            }
        }
    }
    out
}

/// The audio port of the SDP in a traced message.
fn traced_audio_port(msg: &str) -> Option<u16> {
    msg.lines()
        .find_map(|l| l.trim().strip_prefix("m=audio "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
}

/// A re-INVITE in the middle of a call (the caller moves its media to
/// another port) passes both edges as a SIP proxy would pass it, with the
/// SDP on each side pointed at the edge's relay, the key-service session
/// unchanged and no key or quantum header reaching either party; then the
/// BYE ends the call at both edges. SIPp plays both parties
/// (tests/sipp/*.xml; baresip 1.0 cannot re-INVITE on command).
#[test]
fn a_re_invite_passes_both_edges_and_keeps_the_media_on_the_relays() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let mut procs = Procs(Vec::new());
    let edges = sipp_edges(dir, &mut procs, 16, false);
    let (mp_a, mp_b) = (free_port_pair(), free_port_pair());
    edges.callee(
        &mut procs,
        dir,
        "uas_reinvite.xml",
        &["-mp", &mp_b.to_string(), "-trace_msg"],
    );
    let (dir_a, dir_b) = (dir.join("uac"), dir.join("uas"));
    let out = edges
        .caller(dir, "uac_reinvite.xml")
        .args(["-mp", &mp_a.to_string(), "-trace_err"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("sipp (Debian package sip-tester)");
    let logs = || logs(dir, &["edge-a.log", "edge-b.log", "sipp-uas.log"]);
    assert!(
        out.status.success(),
        "the SIPp caller's re-INVITE scenario failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );

    // What the callee received: both INVITEs pointed at B's edge's relay
    // (the same leg), not at the caller's ports; nothing quantum in them.
    let at_b = sipp_received(&dir_b);
    let invites: Vec<&String> = at_b
        .iter()
        .filter(|m| m.contains("CSeq: 1 INVITE") || m.contains("CSeq: 2 INVITE"))
        .filter(|m| m.contains("INVITE sip:"))
        .collect();
    assert_eq!(
        invites.len(),
        2,
        "the INVITE and the re-INVITE reached B: {at_b:?}"
    );
    let ports: Vec<u16> = invites
        .iter()
        .map(|m| traced_audio_port(m).expect("SDP in the INVITE"))
        .collect();
    assert_eq!(
        ports[0], ports[1],
        "the re-INVITE keeps B's media on the relay"
    );
    assert!(
        ports[0] != mp_a && ports[0] != mp_a + 2,
        "B sees the caller's own media port: {ports:?}"
    );
    for m in &invites {
        assert!(!m.contains("a=crypto") && !m.contains("X-QKD-"), "{m}");
    }
    // What the caller received: both answers pointed at A's edge's relay.
    let at_a = sipp_received(&dir_a);
    let answers: Vec<u16> = at_a
        .iter()
        .filter(|m| m.contains("SIP/2.0 200") && m.contains(" INVITE"))
        .filter_map(|m| traced_audio_port(m))
        .collect();
    assert_eq!(answers.len(), 2, "two answers with SDP: {at_a:?}");
    assert_eq!(answers[0], answers[1]);
    assert_ne!(answers[0], mp_b, "A sees the callee's own media port");

    // The BYE ended the call at both edges: one session, one report each.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ra, rb) = (
            reports(&dir.join("edge-a.log")),
            reports(&dir.join("edge-b.log")),
        );
        if ra.len() == 1 && rb.len() == 1 {
            assert_eq!(ra[0]["session"], rb[0]["session"]);
            assert_eq!(ra[0]["mode"], "sm4");
            break;
        }
        assert!(Instant::now() < deadline, "no call reports:\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn percentile_us(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(v, p)
}

/// RTP through two edges in `sm4` mode, from a socket of the test playing
/// A's softphone to one playing B's: every packet arrives as it was sent
/// (SM4-GCM between the edges, opened at B's edge), and the one-way time
/// through both edges is printed next to the same packets sent straight
/// from A to B (the per-packet latency the edges add; BENCHMARKS.md).
/// Bounded here (150 packets at 50/s); as a benchmark:
/// `QKDNET_CALL_MEDIA_PACKETS=1000 cargo test --release --test call_baresip media_through -- --nocapture`
/// (the call is held for 4 s, so at most 190 packets are sent through it).
#[test]
fn media_through_two_sm4_edges_arrives_intact_and_is_timed() {
    let packets: usize = std::env::var("QKDNET_CALL_MEDIA_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
        .min(190);
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let mut procs = Procs(Vec::new());
    let edges = sipp_edges(dir, &mut procs, 16, false);
    let (pa, pb) = (free_port_pair(), free_port_pair());
    let a = UdpSocket::bind(("127.0.0.1", pa)).expect("A's RTP socket");
    let b = UdpSocket::bind(("127.0.0.1", pb)).expect("B's RTP socket");
    b.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    edges.callee(
        &mut procs,
        dir,
        "uas_media.xml",
        &["-key", "rtp_b", &pb.to_string()],
    );
    let dir_a = dir.join("uac");
    let mut caller = edges
        .caller(dir, "uac_media.xml")
        .args(["-key", "rtp_a", &pa.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sipp (Debian package sip-tester)");
    // Where A's edge takes A's RTP: the answer's SDP as A received it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let leg = loop {
        if let Some(p) = sipp_received(&dir_a)
            .iter()
            .filter(|m| m.contains("SIP/2.0 200") && m.contains(" INVITE"))
            .find_map(|m| traced_audio_port(m))
        {
            break SocketAddr::from(([127, 0, 0, 1], p));
        }
        assert!(
            Instant::now() < deadline,
            "the call was not answered:\n{}",
            std::fs::read_to_string(dir.join("edge-a.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let direct = SocketAddr::from(([127, 0, 0, 1], pb));
    let mut through = Vec::new();
    let mut straight = Vec::new();
    for (to, times) in [(leg, &mut through), (direct, &mut straight)] {
        let mut lost = 0;
        for i in 0..packets {
            let mut p = vec![0x80, 0x00];
            p.extend_from_slice(&(i as u16).to_be_bytes());
            p.extend_from_slice(&(i as u32 * 160).to_be_bytes());
            p.extend_from_slice(&0x5151_0001u32.to_be_bytes());
            p.extend((0..160).map(|j| (i * 7 + j) as u8));
            let t = Instant::now();
            a.send_to(&p, to).expect("send");
            let mut buf = [0u8; 2048];
            match b.recv_from(&mut buf) {
                Ok((n, _)) => {
                    times.push(t.elapsed().as_secs_f64() * 1e6);
                    assert_eq!(&buf[..n], &p[..], "packet {i} arrived changed");
                }
                Err(_) => lost += 1,
            }
            std::thread::sleep(Duration::from_millis(20).saturating_sub(t.elapsed()));
        }
        assert!(
            lost <= packets / 50,
            "{lost} of {packets} packets lost on the way to {to}"
        );
    }
    let status = caller.wait().expect("sipp");
    assert!(status.success(), "the SIPp caller failed: {status:?}");
    let (e50, e99) = (
        percentile_us(&mut through, 0.5),
        percentile_us(&mut through, 0.99),
    );
    let (d50, d99) = (
        percentile_us(&mut straight, 0.5),
        percentile_us(&mut straight, 0.99),
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "call_media_path", "mode": "sm4", "packets": packets,
            "through_edges_us_p50": e50, "through_edges_us_p99": e99,
            "direct_us_p50": d50, "direct_us_p99": d99,
            "added_us_p50": e50 - d50, "added_us_p99": e99 - d99,
        })
    );
}
