//! The security gateway end to end, as real processes in network namespaces:
//!
//! ```text
//! site-A (10.71.1.2) ─ gw-A [qkd0 10.71.254.1] ═ wan 10.71.0.0/24 ═ gw-B [qkd0 10.71.254.2] ─ site-B (10.71.2.2)
//! ```
//!
//! Two `qkdnet gateway run` processes (SAEs alice at kme-a and bob at kme-b of an
//! in-process two-KME network with seeded TEST keys) carry real IP traffic:
//! iperf3 and ping between the sites. The wan is captured with tcpdump. Needs
//! root (namespaces, TUN devices); `scripts/test.sh` installs iperf3 and tcpdump.
//! Nothing leaves the namespaces these tests create.

mod apps_common;
mod netns_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use apps_common::Net;
use netns_common::{KmeForward, Netns, in_ns, sh};

/// One topology at a time: the tests share names of devices inside their
/// namespaces and the two cores.
static SERIAL: Mutex<()> = Mutex::new(());
static N: AtomicU32 = AtomicU32::new(0);

const WAN_A: &str = "10.71.0.1";
const WAN_B: &str = "10.71.0.2";
const SITE_A: &str = "10.71.1.2";
const SITE_B: &str = "10.71.2.2";
const PORT: u16 = 7771;

struct Rig {
    dir: PathBuf,
    prefix: String,
    ns: Netns,
    gws: Vec<Child>,
    fwd_a: KmeForward,
    fwd_b: KmeForward,
    // Dropped last: the KMEs and the runtime they run on.
    _net: Net,
    _rt: tokio::runtime::Runtime,
}

impl Rig {
    /// Runs `qkdnet ARGS` inside namespace `ns`, logging to `{name}.log`.
    fn spawn(&mut self, name: &str, ns: &str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_qkdnet")])
            .args(args)
            .env("QKDNET_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn qkdnet");
        self.gws.push(child);
    }

    fn ns(&self, which: &str) -> &str {
        let i = ["sa", "ga", "gb", "sb"]
            .iter()
            .position(|n| *n == which)
            .expect("namespace name");
        &self.ns.names[i]
    }

    fn metrics(&self, gw: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{gw}.prom"))).unwrap_or_default()
    }

    /// A counter of `gw`'s metrics file; 0 before the file exists, a panic if
    /// the file lacks it (so a renamed metric cannot pass a test as zero).
    fn counter(&self, gw: &str, name: &str) -> u64 {
        let m = self.metrics(gw);
        if m.is_empty() {
            return 0;
        }
        let keys = [
            format!("qkdnet_gateway_{name}_total{{"),
            format!("qkdnet_gateway_{name}{{"),
        ];
        m.lines()
            .find(|l| keys.iter().any(|k| l.starts_with(k.as_str())))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{gw} has no metric {name}:\n{m}"))
    }

    /// Waits (bounded) until `f` holds, re-reading the metrics files.
    fn wait_for(&self, what: &str, limit: Duration, f: impl Fn(&Rig) -> bool) {
        let t0 = Instant::now();
        while !f(self) {
            assert!(
                t0.elapsed() < limit,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".log").map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for name in names {
            s += &format!(
                "--- {name} log ---\n{}\n--- {name} metrics ---\n{}\n",
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default(),
                self.metrics(&name)
            );
        }
        s
    }

    fn ping(&self, count: u32, interval: &str, extra: &[&str]) -> (u32, u32) {
        let c = count.to_string();
        let mut args = vec!["ping", "-n", "-q", "-c", &c, "-i", interval, "-W", "1"];
        args.extend_from_slice(extra);
        args.push(SITE_B);
        let (_, out) = in_ns(self.ns("sa"), &args);
        parse_ping(&out).unwrap_or_else(|| panic!("ping output: {out}"))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for g in &mut self.gws {
            let _ = Command::new("kill")
                .args(["-TERM", &g.id().to_string()])
                .status();
        }
        let t0 = Instant::now();
        for g in &mut self.gws {
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = g.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = g.kill();
            let _ = g.wait();
        }
    }
}

/// (transmitted, received) from ping's summary line.
fn parse_ping(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((nums.next()?.parse().ok()?, nums.next()?.parse().ok()?))
}

fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the gateway tests need root (network namespaces and TUN devices)"
    );
}

fn gateway_toml(rig_dir: &Path, gw: &str, rekey: f64, lifetime: f64, pad_to: usize) -> String {
    let (role, listen, peer, tun, sae, peer_sae) = match gw {
        "gw-a" => ("initiator", WAN_A, WAN_B, "10.71.254.1", "alice", "bob"),
        _ => ("responder", WAN_B, WAN_A, "10.71.254.2", "bob", "alice"),
    };
    format!(
        r#"role = "{role}"
listen = "{listen}:{PORT}"
peer = "{peer}:{PORT}"
pad_to = {pad_to}
metrics_file = "{gw}.prom"

[tun]
name = "qkd0"
address = "{tun}"
netmask = "255.255.255.252"
mtu = 1400

{keying}"#,
        keying = keying_toml(rig_dir, sae, peer_sae, rekey, lifetime)
    )
}

/// The `[kme]` and `[rekey]` sections gateways and WireGuard agents share.
fn keying_toml(rig_dir: &Path, sae: &str, peer_sae: &str, rekey: f64, lifetime: f64) -> String {
    format!(
        r#"[kme]
connect = "{connect}"
sae = "{sae}"
peer_sae = "{peer_sae}"

[rekey]
seconds = {rekey}
lifetime_seconds = {lifetime}
"#,
        connect = rig_dir.join("connect.json").display()
    )
}

/// Builds the topology, starts the KMEs and both gateways, and waits until the
/// tunnel carries traffic.
fn rig(blocks: u64, rekey: f64, lifetime: f64, pad_to: usize) -> Rig {
    let mut rig = topology(blocks);
    let [ga, gb] = [rig.ns("ga").to_owned(), rig.ns("gb").to_owned()];
    let dir = rig.dir.clone();
    for (gw, gns) in [("gw-b", &gb), ("gw-a", &ga)] {
        let cfg = dir.join(format!("{gw}.toml"));
        std::fs::write(&cfg, gateway_toml(&dir, gw, rekey, lifetime, pad_to)).expect("config");
        rig.spawn(
            gw,
            gns,
            &["gateway", "run", "--config", &cfg.to_string_lossy()],
        );
    }
    // The TUN devices exist once the gateways run; then route the far site.
    for (g, far) in [(&ga, "10.71.2.0/24"), (&gb, "10.71.1.0/24")] {
        let t0 = Instant::now();
        while !in_ns(g, &["ip", "link", "show", "qkd0"]).0 {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no TUN device\n{}",
                rig.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sh(&["ip", "-n", g, "route", "add", far, "dev", "qkd0"]);
    }
    rig.wait_for("both gateways up", Duration::from_secs(20), |r| {
        r.counter("gw-a", "up") == 1 && r.counter("gw-b", "up") == 1
    });
    rig
}

/// The namespaces, veths, routes of the sites, KMEs and forwarders: no gateway.
fn topology(blocks: u64) -> Rig {
    require_root();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let net = rt.block_on(Net::start_with(blocks, 2048));
    let prefix = format!(
        "qg{}{}",
        std::process::id() % 10_000,
        N.fetch_add(1, Ordering::SeqCst)
    );
    let ns = Netns::create(&prefix, &["sa", "ga", "gb", "sb"]);
    let [sa, ga, gb, sb] = [0, 1, 2, 3].map(|i| ns.names[i].clone());
    ns.link(
        &sa,
        "eth0",
        &format!("{SITE_A}/24"),
        &ga,
        "lan0",
        "10.71.1.1/24",
    );
    ns.link(
        &ga,
        "wan0",
        &format!("{WAN_A}/24"),
        &gb,
        "wan0",
        &format!("{WAN_B}/24"),
    );
    ns.link(
        &gb,
        "lan0",
        "10.71.2.1/24",
        &sb,
        "eth0",
        &format!("{SITE_B}/24"),
    );
    sh(&[
        "ip",
        "-n",
        &sa,
        "route",
        "add",
        "default",
        "via",
        "10.71.1.1",
    ]);
    sh(&[
        "ip",
        "-n",
        &sb,
        "route",
        "add",
        "default",
        "via",
        "10.71.2.1",
    ]);
    for g in [&ga, &gb] {
        let (ok, out) = in_ns(g, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        assert!(ok, "{out}");
    }
    let port = |r: &qkdnet_kms::config::RunningKme| r.server.local_addr().port();
    let fwd_a = KmeForward::start(&ga, port(&net.a));
    let fwd_b = KmeForward::start(&gb, port(&net.b));
    Rig {
        dir: net.dir.clone(),
        prefix,
        ns,
        gws: Vec::new(),
        fwd_a,
        fwd_b,
        _net: net,
        _rt: rt,
    }
}

/// Starts tcpdump on gw-B's wan interface; returns the child and the pcap path.
fn capture(rig: &Rig, name: &str) -> (Child, PathBuf) {
    let pcap = rig.dir.join(name);
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            rig.ns("gb"),
            "tcpdump",
            "-i",
            "wan0",
            "-U",
            "-n",
            "-w",
        ])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    // tcpdump needs a moment to attach.
    std::thread::sleep(Duration::from_millis(700));
    (child, pcap)
}

fn stop_capture(mut c: Child) {
    let _ = Command::new("kill")
        .args(["-INT", &c.id().to_string()])
        .status();
    let _ = c.wait();
}

/// One line per captured packet, as tcpdump prints it.
fn capture_lines(pcap: &Path) -> Vec<String> {
    let out = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(pcap)
        .output()
        .expect("tcpdump -r");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every captured packet is tunnel UDP between the two gateways (or ARP).
fn assert_only_tunnel_packets(lines: &[String]) {
    let a = format!("{WAN_A}.{PORT}");
    let b = format!("{WAN_B}.{PORT}");
    let tunnel = |l: &str| {
        (l.contains(&format!("{a} > {b}: UDP")) || l.contains(&format!("{b} > {a}: UDP")))
            && !l.contains("ICMP")
    };
    for l in lines {
        assert!(
            tunnel(l) || l.contains("ARP"),
            "a packet on the wan that is not tunnel traffic: {l}"
        );
    }
}

#[test]
fn iperf3_and_ping_cross_the_tunnel_and_the_wan_sees_only_sealed_packets() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rig = rig(16, 30.0, 90.0, 0);
    let (cap, pcap) = capture(&rig, "wan.pcap");
    // A ping with a recognisable payload pattern…
    let marker = "71646b6e65742d706c61696e"; // "qdknet-plain"
    let (tx, rx) = rig.ping(5, "0.2", &["-p", marker]);
    assert_eq!((tx, rx), (5, 5), "{}", rig.logs());
    // …and TCP bulk traffic with iperf3.
    let mbps = iperf(&rig, 2);
    eprintln!("iperf3 site-A → site-B through the tunnel: {mbps:.0} Mbit/s");
    assert!(mbps > 0.0);
    stop_capture(cap);
    let lines = capture_lines(&pcap);
    assert!(lines.len() > 100, "capture saw {} packets", lines.len());
    assert_only_tunnel_packets(&lines);
    // No byte of the plaintext pattern on the wire.
    let raw = std::fs::read(&pcap).expect("pcap");
    let pattern = hex::decode(marker).expect("hex");
    assert!(
        !raw.windows(pattern.len()).any(|w| w == pattern.as_slice()),
        "the ping's plaintext payload appears on the wan"
    );
    assert_eq!(rig.counter("gw-a", "rx_forged"), 0);
    assert_eq!(rig.counter("gw-b", "rx_forged"), 0);
}

#[test]
fn ping_through_twenty_rekeys_and_kme_outages_loses_no_packet() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A key every 0.25 s; an SA lives 6 s without a successor.
    let rig = rig(16, 0.25, 6.0, 0);
    let before = rig.counter("gw-a", "rekeys");
    let (tx, rx) = rig.ping(600, "0.01", &[]);
    let rekeys = rig.counter("gw-a", "rekeys") - before;
    assert_eq!(tx, 600);
    assert_eq!(
        rx,
        tx,
        "packets lost across {rekeys} rekeys\n{}",
        rig.logs()
    );
    assert!(rekeys >= 20, "only {rekeys} rekeys in 6 s\n{}", rig.logs());

    // The responder's KME unreachable for 2 s, then the initiator's: the
    // current key carries the traffic, rekeying resumes by itself.
    for fwd in [&rig.fwd_b, &rig.fwd_a] {
        let pinger = {
            let ns = rig.ns("sa").to_owned();
            std::thread::spawn(move || {
                in_ns(
                    &ns,
                    &[
                        "ping", "-n", "-q", "-c", "400", "-i", "0.01", "-W", "1", SITE_B,
                    ],
                )
            })
        };
        std::thread::sleep(Duration::from_millis(500));
        fwd.set_up(false);
        std::thread::sleep(Duration::from_secs(2));
        let during = rig.counter("gw-a", "rekeys");
        fwd.set_up(true);
        let (_, out) = pinger.join().expect("ping thread");
        let (tx, rx) = parse_ping(&out).expect("ping summary");
        assert_eq!(rx, tx, "packets lost across a KME outage\n{}", rig.logs());
        rig.wait_for("rekeying to resume", Duration::from_secs(20), |r| {
            r.counter("gw-a", "rekeys") > during + 2
        });
    }
    assert!(rig.counter("gw-a", "key_failures") + rig.counter("gw-b", "key_failures") > 0);
    assert_eq!(rig.counter("gw-a", "dropped_no_key"), 0, "{}", rig.logs());
}

#[test]
fn no_key_means_no_traffic_and_the_tunnel_reopens_when_keys_return() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rig = rig(16, 0.5, 2.0, 0);
    let (cap, pcap) = capture(&rig, "closed.pcap");
    // Both KMEs unreachable: the current SA lives 2 s, then traffic stops.
    rig.fwd_a.set_up(false);
    rig.fwd_b.set_up(false);
    rig.wait_for("the tunnel to close", Duration::from_secs(10), |r| {
        r.counter("gw-a", "up") == 0
    });
    let dropped = rig.counter("gw-a", "dropped_no_key");
    let (tx, rx) = rig.ping(10, "0.1", &["-p", "636c6f736564"]);
    assert_eq!((tx, rx), (10, 0), "traffic passed with no live key");
    rig.wait_for("drops to be counted", Duration::from_secs(5), |r| {
        r.counter("gw-a", "dropped_no_key") >= dropped + 10
    });
    stop_capture(cap);
    let lines = capture_lines(&pcap);
    assert_only_tunnel_packets(&lines);
    let raw = std::fs::read(&pcap).expect("pcap");
    assert!(
        !raw.windows(6).any(|w| w == b"closed"),
        "plaintext on the wan while the tunnel was closed"
    );
    let log = std::fs::read_to_string(rig.dir.join("gw-a.log")).unwrap_or_default();
    assert!(
        log.contains("fail closed"),
        "no log line says the tunnel closed:\n{log}"
    );
    // Keys return: the tunnel reopens by itself.
    let back = Instant::now();
    rig.fwd_a.set_up(true);
    rig.fwd_b.set_up(true);
    rig.wait_for("the tunnel to reopen", Duration::from_secs(20), |r| {
        r.counter("gw-a", "up") == 1 && r.counter("gw-b", "up") == 1
    });
    eprintln!(
        "KME reachable again → tunnel up: {:.2} s",
        back.elapsed().as_secs_f64()
    );
    let (tx, rx) = rig.ping(5, "0.2", &[]);
    assert_eq!((tx, rx), (5, 5), "{}", rig.logs());
}

/// Sends raw UDP datagrams that claim to come from gw-B's wan address and port
/// (an attacker on the wan can spoof them), from inside gw-B's namespace.
fn inject(rig: &Rig, payloads: &[Vec<u8>]) {
    let hexes: Vec<String> = payloads.iter().map(hex::encode).collect();
    let script = format!(
        r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for h in sys.argv[1:]:
    p = bytes.fromhex(h)
    udp = struct.pack('!HHHH', {PORT}, {PORT}, 8 + len(p), 0) + p
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton('{WAN_B}'), socket.inet_aton('{WAN_A}'))
    s.sendto(ip + udp, ('{WAN_A}', 0))
"#
    );
    let mut args = vec!["python3", "-c", &script];
    args.extend(hexes.iter().map(String::as_str));
    let (ok, out) = in_ns(rig.ns("gb"), &args);
    assert!(ok, "injection failed: {out}");
}

/// The datagrams gw-B sent to gw-A in a capture (UDP payloads), via tcpdump's
/// hex dump.
fn captured_b_to_a(pcap: &Path) -> Vec<Vec<u8>> {
    let out = Command::new("tcpdump")
        .args(["-n", "-x", "-r"])
        .arg(pcap)
        .arg(format!("src host {WAN_B} and udp"))
        .output()
        .expect("tcpdump -x");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut packets = Vec::new();
    let mut cur: Option<Vec<u8>> = None;
    for line in text.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("0x") {
            let hexpart = rest.split_once(':').map_or("", |(_, h)| h);
            let bytes: String = hexpart.split_whitespace().collect();
            if let (Some(c), Ok(b)) = (cur.as_mut(), hex::decode(bytes)) {
                c.extend(b);
            }
        } else {
            if let Some(c) = cur.take() {
                packets.push(c);
            }
            cur = Some(Vec::new());
        }
    }
    packets.extend(cur);
    // IPv4 header (IHL words) + 8 bytes of UDP header.
    packets
        .into_iter()
        .filter(|p| p.len() > 28)
        .map(|p| p[usize::from(p[0] & 0x0f) * 4 + 8..].to_vec())
        .collect()
}

#[test]
fn malformed_replayed_truncated_and_forged_packets_are_dropped_and_counted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rig = rig(16, 30.0, 90.0, 0);
    let (cap, pcap) = capture(&rig, "replay.pcap");
    let (tx, rx) = rig.ping(3, "0.2", &[]);
    assert_eq!((tx, rx), (3, 3));
    stop_capture(cap);
    let real: Vec<Vec<u8>> = captured_b_to_a(&pcap)
        .into_iter()
        .filter(|p| p.len() > 40 && p[..4] != [0, 0, 0, 0])
        .collect();
    assert!(!real.is_empty(), "no data packet from gw-B captured");
    let one = real[0].clone();
    // Fresh sequence numbers (the window has not seen them), old tags: forged.
    let mut forged = one.clone();
    forged[10] = forged[10].wrapping_add(1);
    let mut forged_body = one.clone();
    forged_body[10] = forged_body[10].wrapping_add(2);
    let mid = forged_body.len() / 2;
    forged_body[mid] ^= 0x40;
    let garbage = vec![
        vec![],
        vec![1, 2, 3],
        vec![0, 0, 0, 0, 9, 1],        // control, unknown version
        vec![0, 0, 0, 0, 1, 77, 1, 2], // control, unknown type
        one[..20].to_vec(),            // truncated data
    ];
    let before: Vec<u64> = ["rx_replayed", "rx_forged", "rx_malformed", "rx_unknown_spi"]
        .iter()
        .map(|c| rig.counter("gw-a", c))
        .collect();
    let mut unknown = one.clone();
    unknown[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    let mut all = vec![one.clone(), one, forged, forged_body, unknown];
    all.extend(garbage);
    inject(&rig, &all);
    rig.wait_for("the drops to be counted", Duration::from_secs(10), |r| {
        r.counter("gw-a", "rx_replayed") >= before[0] + 2
            && r.counter("gw-a", "rx_forged") >= before[1] + 2
            && r.counter("gw-a", "rx_malformed") >= before[2] + 5
            && r.counter("gw-a", "rx_unknown_spi") > before[3]
    });
    // The gateway is still alive and forwarding.
    let (tx, rx) = rig.ping(3, "0.2", &[]);
    assert_eq!((tx, rx), (3, 3), "{}", rig.logs());
}

/// Summary of ping's per-packet RTTs (ms): p50, p99.
fn ping_rtts(rig: &Rig, count: u32) -> (f64, f64) {
    let c = count.to_string();
    let (_, out) = in_ns(
        rig.ns("sa"),
        &["ping", "-n", "-c", &c, "-i", "0.01", "-W", "1", SITE_B],
    );
    let mut rtts: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(!rtts.is_empty(), "no replies: {out}");
    rtts.sort_by(f64::total_cmp);
    let q = |p: f64| rtts[((rtts.len() - 1) as f64 * p).round() as usize];
    (q(0.5), q(0.99))
}

/// iperf3 site-A → site-B for `secs` seconds: received Mbit/s.
fn iperf(rig: &Rig, secs: u32) -> f64 {
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            rig.ns("sb"),
            "iperf3",
            "-s",
            "-1",
            "-B",
            SITE_B,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let t = secs.to_string();
    let (ok, out) = in_ns(
        rig.ns("sa"),
        &[
            "iperf3",
            "-c",
            SITE_B,
            "-t",
            &t,
            "-J",
            "--connect-timeout",
            "3000",
        ],
    );
    let _ = server.wait();
    assert!(ok, "iperf3 failed: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("received rate")
        / 1e6
}

/// Throughput and latency through the tunnel against wireguard-go (with QKD
/// preshared keys from the agent) and against plain routing over the same wan,
/// in one run. A short bounded run in the suite; as a benchmark:
/// `QKDNET_GW_BENCH_SECONDS=10 QKDNET_GW_BENCH_PINGS=1000 cargo test --release
/// --test gateway_netns tunnel_against_plain_routing -- --nocapture`
/// (prints one JSON line).
#[test]
fn tunnel_against_plain_routing_throughput_and_latency() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let secs: u32 = std::env::var("QKDNET_GW_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .clamp(1, 60);
    let pings: u32 = std::env::var("QKDNET_GW_BENCH_PINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
        .clamp(10, 10_000);
    let mut rig = rig(16, 30.0, 90.0, 0);
    let tunnel_mbps = iperf(&rig, secs);
    let (tunnel_p50, tunnel_p99) = ping_rtts(&rig, pings);
    // wireguard-go over the same wan at the same MTU, with QKD preshared keys.
    let ifaces = wireguard(&mut rig, 30.0, 90.0);
    rig.wait_for("WireGuard peers", Duration::from_secs(20), |r| {
        psk_of(r, "ga", &ifaces[0]).is_some() && psk_of(r, "gb", &ifaces[1]).is_some()
    });
    let (ga, gb) = (rig.ns("ga").to_owned(), rig.ns("gb").to_owned());
    sh(&[
        "ip",
        "-n",
        &ga,
        "route",
        "replace",
        "10.71.2.0/24",
        "dev",
        &ifaces[0],
    ]);
    sh(&[
        "ip",
        "-n",
        &gb,
        "route",
        "replace",
        "10.71.1.0/24",
        "dev",
        &ifaces[1],
    ]);
    let wg_mbps = iperf(&rig, secs);
    let (wg_p50, wg_p99) = ping_rtts(&rig, pings);
    // The same path with the tunnel taken out: the gateways route the sites
    // over the wan directly.
    let (ga, gb) = (rig.ns("ga").to_owned(), rig.ns("gb").to_owned());
    sh(&[
        "ip",
        "-n",
        &ga,
        "route",
        "replace",
        "10.71.2.0/24",
        "via",
        WAN_B,
    ]);
    sh(&[
        "ip",
        "-n",
        &gb,
        "route",
        "replace",
        "10.71.1.0/24",
        "via",
        WAN_A,
    ]);
    let plain_mbps = iperf(&rig, secs);
    let (plain_p50, plain_p99) = ping_rtts(&rig, pings);
    assert!(tunnel_mbps > 0.0 && plain_mbps > 0.0 && wg_mbps > 0.0);
    println!(
        "{}",
        serde_json::json!({
            "bench": "gateway",
            "seconds": secs,
            "pings": pings,
            "sm4_kernel": logged_kernel(&rig),
            "tunnel_mbit_s": tunnel_mbps,
            "wireguard_go_mbit_s": wg_mbps,
            "wireguard_go_rtt_ms": {"p50": wg_p50, "p99": wg_p99},
            "tunnel_over_wireguard_go": tunnel_mbps / wg_mbps,
            "plain_mbit_s": plain_mbps,
            "tunnel_rtt_ms": {"p50": tunnel_p50, "p99": tunnel_p99},
            "plain_rtt_ms": {"p50": plain_p50, "p99": plain_p99},
            "added_rtt_ms": {"p50": tunnel_p50 - plain_p50, "p99": tunnel_p99 - plain_p99},
        })
    );
}

/// The SM4 kernel gw-A logged at start.
fn logged_kernel(rig: &Rig) -> String {
    std::fs::read_to_string(rig.dir.join("gw-a.log"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.split("SM4 kernel ").nth(1).map(str::to_owned))
        .unwrap_or_default()
}

/// `wg OUTPUT` inside a namespace (wireguard-tools reads wireguard-go's UAPI).
fn wg(rig: &Rig, ns: &str, args: &[&str]) -> String {
    let mut a = vec!["wg"];
    a.extend_from_slice(args);
    let (ok, out) = in_ns(rig.ns(ns), &a);
    assert!(ok, "wg {args:?}: {out}");
    out
}

/// A WireGuard keypair made by `wg genkey | wg pubkey`: (private, public).
fn wg_keypair() -> (String, String) {
    let private = Command::new("wg")
        .arg("genkey")
        .output()
        .expect("wg genkey");
    let private = String::from_utf8_lossy(&private.stdout).trim().to_owned();
    let mut p = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    use std::io::Write as _;
    p.stdin
        .take()
        .expect("stdin")
        .write_all(private.as_bytes())
        .expect("write");
    let out = p.wait_with_output().expect("wg pubkey");
    (
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// The preshared key `wg show IFACE preshared-keys` lists (one peer), if any.
fn psk_of(rig: &Rig, ns: &str, iface: &str) -> Option<String> {
    let out = wg(rig, ns, &["show", iface, "preshared-keys"]);
    let psk = out.lines().next()?.split_whitespace().nth(1)?.to_owned();
    (psk != "(none)").then_some(psk)
}

/// Two wireguard-go interfaces (MTU 1400, as the gateway's TUN) between the
/// gateways with no peer, routed to the far site, and the two agents that add
/// the peers with QKD preshared keys. Returns the interface names.
fn wireguard(rig: &mut Rig, rekey: f64, lifetime: f64) -> [String; 2] {
    let (ga, gb) = (rig.ns("ga").to_owned(), rig.ns("gb").to_owned());
    let ifaces = [format!("{}a", rig.prefix), format!("{}b", rig.prefix)];
    let keys = [wg_keypair(), wg_keypair()];
    for (i, (ns, tun, far)) in [
        (&ga, "10.71.253.1/30", "10.71.2.0/24"),
        (&gb, "10.71.253.2/30", "10.71.1.0/24"),
    ]
    .into_iter()
    .enumerate()
    {
        let iface = &ifaces[i];
        let log =
            std::fs::File::create(rig.dir.join(format!("wireguard-go-{i}.log"))).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", iface])
            .env("LOG_LEVEL", "verbose")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("wireguard-go");
        rig.gws.push(child);
        let t0 = Instant::now();
        while !Path::new(&format!("/var/run/wireguard/{iface}.sock")).exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "wireguard-go did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let keyfile = rig.dir.join(format!("wg-{i}.key"));
        std::fs::write(&keyfile, &keys[i].0).expect("key file");
        let (ok, out) = in_ns(
            ns,
            &[
                "wg",
                "set",
                iface,
                "private-key",
                &keyfile.to_string_lossy(),
                "listen-port",
                "51820",
            ],
        );
        assert!(ok, "{out}");
        sh(&["ip", "-n", ns, "addr", "add", tun, "dev", iface]);
        sh(&["ip", "-n", ns, "link", "set", iface, "mtu", "1400", "up"]);
        sh(&["ip", "-n", ns, "route", "replace", far, "dev", iface]);
    }
    // No peer yet: nothing can handshake.
    for (ns, iface) in [("ga", &ifaces[0]), ("gb", &ifaces[1])] {
        assert_eq!(wg(rig, ns, &["show", iface, "peers"]).trim(), "");
    }
    for (i, (name, ns, role, listen, peer, sae, peer_sae, far)) in [
        (
            "wg-a",
            &ga,
            "initiator",
            WAN_A,
            WAN_B,
            "alice",
            "bob",
            "10.71.2.0/24",
        ),
        (
            "wg-b",
            &gb,
            "responder",
            WAN_B,
            WAN_A,
            "bob",
            "alice",
            "10.71.1.0/24",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = rig.dir.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                r#"role = "{role}"
listen = "{listen}:7772"
peer = "{peer}:7772"
[wireguard]
interface = "{iface}"
peer_public_key = "{pk}"
endpoint = "{peer}:51820"
allowed_ips = ["{far}", "10.71.253.0/30"]
{keying}"#,
                iface = ifaces[i],
                pk = keys[1 - i].1,
                keying = keying_toml(&rig.dir, sae, peer_sae, rekey, lifetime)
            ),
        )
        .expect("config");
        rig.spawn(
            name,
            ns,
            &["gateway", "wg-agent", "--config", &cfg.to_string_lossy()],
        );
    }
    ifaces
}

/// wireguard-go between the gateways, its peer's preshared key kept by two
/// `qkdnet gateway wg-agent`s: the peer appears only with a QKD preshared key,
/// handshakes and pings go through, the key rotates at both ends in step, and
/// with no key past its lifetime the agents remove the peer (traffic stops).
#[test]
fn wireguard_go_peers_take_qkd_preshared_keys_before_any_handshake() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = topology(16);
    let ifaces = wireguard(&mut rig, 1.0, 3.0);
    // Both ends get the same QKD preshared key (the peer appears with it).
    rig.wait_for(
        "a preshared key at both ends",
        Duration::from_secs(20),
        |r| {
            let (a, b) = (psk_of(r, "ga", &ifaces[0]), psk_of(r, "gb", &ifaces[1]));
            a.is_some() && a == b
        },
    );
    let first = psk_of(&rig, "ga", &ifaces[0]);
    let (tx, rx) = rig.ping(5, "0.2", &[]);
    assert_eq!((tx, rx), (5, 5), "{}", rig.logs());
    let hs = wg(&rig, "ga", &["show", &ifaces[0], "latest-handshakes"]);
    let when: u64 = hs
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(when > 0, "no handshake: {hs}");
    // Rotation: a new key every second, the same at both ends.
    rig.wait_for(
        "the preshared key to rotate",
        Duration::from_secs(20),
        |r| {
            let (a, b) = (psk_of(r, "ga", &ifaces[0]), psk_of(r, "gb", &ifaces[1]));
            a.is_some() && a != first && a == b
        },
    );
    let (tx, rx) = rig.ping(5, "0.2", &[]);
    assert_eq!((tx, rx), (5, 5), "{}", rig.logs());
    // No key past the lifetime: the peer goes (fail closed), traffic stops.
    rig.fwd_a.set_up(false);
    rig.fwd_b.set_up(false);
    rig.wait_for("the peers to be removed", Duration::from_secs(20), |r| {
        wg(r, "ga", &["show", &ifaces[0], "peers"])
            .trim()
            .is_empty()
            && wg(r, "gb", &["show", &ifaces[1], "peers"])
                .trim()
                .is_empty()
    });
    let (tx, rx) = rig.ping(3, "0.2", &[]);
    assert_eq!((tx, rx), (3, 0), "traffic without a key");
    // Keys return: the peer comes back with a fresh preshared key.
    rig.fwd_a.set_up(true);
    rig.fwd_b.set_up(true);
    rig.wait_for("the peers to return", Duration::from_secs(20), |r| {
        let (a, b) = (psk_of(r, "ga", &ifaces[0]), psk_of(r, "gb", &ifaces[1]));
        a.is_some() && a == b
    });
    let (tx, rx) = rig.ping(5, "0.2", &[]);
    assert_eq!((tx, rx), (5, 5), "{}", rig.logs());
}
