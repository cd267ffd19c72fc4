//! The running gateway: a TUN device, a UDP socket on the wan, the KME.
//!
//! Three threads. The *sender* reads IP packets from the TUN device, seals them
//! under the current outbound SA and sends them to the peer gateway; the
//! *receiver* reads the wan socket, opens data packets under the inbound SA their
//! SPI names and writes them to the TUN device, and hands control messages on.
//! Both own their SAs and take changes from the *manager* over channels, so the
//! packet path takes no lock. The manager runs [`KeyCtl`] on a small tokio
//! runtime: it asks the KME for keys (ETSI GS QKD 014 over mutual TLS), sends
//! offers and acks, installs and retires SAs, and writes the metrics file.
//!
//! Fail closed: with no live outbound SA the sender drops the packet and counts
//! it (`dropped_no_key`); nothing is ever sent unprotected.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc as amp;

use crate::config::GatewayConfig;
use crate::keyctl::Event;
use crate::keymgr::{Installer, KeyManager, ToManager};
use crate::sa::{EpochKeys, Inbound, OpenError, Outbound};
use crate::wire::{self, Datagram};

/// How long a blocked read waits before the thread looks at its channel again.
const POLL: Duration = Duration::from_millis(100);
/// Largest datagram handled.
const MAX_DATAGRAM: usize = 65_535;

/// Counters, shared by the threads and written to the metrics file.
#[derive(Debug, Default)]
pub struct Stats {
    /// Packets sealed and sent.
    pub tx_packets: AtomicU64,
    /// IP bytes sealed.
    pub tx_bytes: AtomicU64,
    /// Packets opened and delivered.
    pub rx_packets: AtomicU64,
    /// IP bytes delivered.
    pub rx_bytes: AtomicU64,
    /// Outgoing packets dropped for want of a live key.
    pub dropped_no_key: AtomicU64,
    /// Incoming packets whose sequence number was seen before or too old.
    pub rx_replayed: AtomicU64,
    /// Incoming packets whose tag did not verify.
    pub rx_forged: AtomicU64,
    /// Incoming datagrams that are not packets of this tunnel.
    pub rx_malformed: AtomicU64,
    /// Incoming packets under an SPI with no SA.
    pub rx_unknown_spi: AtomicU64,
    /// Incoming packets under an SA past its lifetime.
    pub rx_expired: AtomicU64,
    /// Datagrams from an address other than the peer's.
    pub rx_wrong_source: AtomicU64,
    /// Completed rekeys.
    pub rekeys: AtomicU64,
    /// Failed attempts to get a key.
    pub key_failures: AtomicU64,
    /// 1 while a live outbound key exists.
    pub up: AtomicU64,
}

impl Stats {
    /// Prometheus text exposition of the counters.
    pub fn render(&self, gateway: &str) -> String {
        let mut s = String::new();
        let l = format!("{{gateway=\"{gateway}\"}}");
        for (name, help, kind, v) in [
            (
                "qkdnet_gateway_tx_packets_total",
                "Packets sealed and sent to the peer",
                "counter",
                &self.tx_packets,
            ),
            (
                "qkdnet_gateway_tx_bytes_total",
                "IP bytes sealed",
                "counter",
                &self.tx_bytes,
            ),
            (
                "qkdnet_gateway_rx_packets_total",
                "Packets opened and delivered",
                "counter",
                &self.rx_packets,
            ),
            (
                "qkdnet_gateway_rx_bytes_total",
                "IP bytes delivered",
                "counter",
                &self.rx_bytes,
            ),
            (
                "qkdnet_gateway_dropped_no_key_total",
                "Outgoing packets dropped: no live key (fail closed)",
                "counter",
                &self.dropped_no_key,
            ),
            (
                "qkdnet_gateway_rx_replayed_total",
                "Incoming packets refused as replays",
                "counter",
                &self.rx_replayed,
            ),
            (
                "qkdnet_gateway_rx_forged_total",
                "Incoming packets whose tag did not verify",
                "counter",
                &self.rx_forged,
            ),
            (
                "qkdnet_gateway_rx_malformed_total",
                "Incoming datagrams that are not tunnel packets",
                "counter",
                &self.rx_malformed,
            ),
            (
                "qkdnet_gateway_rx_unknown_spi_total",
                "Incoming packets under an unknown SPI",
                "counter",
                &self.rx_unknown_spi,
            ),
            (
                "qkdnet_gateway_rx_expired_total",
                "Incoming packets under an expired SA",
                "counter",
                &self.rx_expired,
            ),
            (
                "qkdnet_gateway_rx_wrong_source_total",
                "Datagrams from an address other than the peer",
                "counter",
                &self.rx_wrong_source,
            ),
            (
                "qkdnet_gateway_rekeys_total",
                "Completed rekeys",
                "counter",
                &self.rekeys,
            ),
            (
                "qkdnet_gateway_key_failures_total",
                "Failed attempts to get a key from the KME",
                "counter",
                &self.key_failures,
            ),
            (
                "qkdnet_gateway_up",
                "1 while a live key protects outgoing traffic",
                "gauge",
                &self.up,
            ),
        ] {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{l} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        s
    }
}

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The TUN device could not be made.
    #[error("TUN device {name}: {error} (needs CAP_NET_ADMIN, i.e. root)")]
    Tun {
        /// Device name.
        name: String,
        /// Why.
        error: String,
    },
    /// The wan socket could not be bound.
    #[error("UDP {addr}: {error}")]
    Socket {
        /// Address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The ETSI client could not be made.
    #[error("KME client: {0}")]
    Kme(String),
    /// The tokio runtime could not start.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

enum TxUpdate {
    Send(Outbound),
}

enum RxUpdate {
    Install(Inbound),
    Retire { spi: u32, at: Instant },
}

/// Runs the gateway until `stop` resolves.
pub fn run(
    cfg: GatewayConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Arc<Stats>, GatewayError> {
    let client = qkdnet_etsi::connect::ConnectFile::load(&cfg.connect)
        .and_then(|f| f.client(&cfg.sae, Duration::from_secs(5)))
        .map_err(|e| {
            GatewayError::Kme(format!("SAE {} of {}: {e}", cfg.sae, cfg.connect.display()))
        })?;
    let mut tc = tun::Configuration::default();
    tc.tun_name(&cfg.tun_name)
        .address(cfg.tun_address)
        .netmask(cfg.tun_netmask)
        .mtu(cfg.mtu)
        .up();
    let dev = tun::create(&tc).map_err(|e| GatewayError::Tun {
        name: cfg.tun_name.clone(),
        error: e.to_string(),
    })?;
    let (reader, writer) = dev.split();
    let sock = UdpSocket::bind(cfg.listen).map_err(|error| GatewayError::Socket {
        addr: cfg.listen,
        error,
    })?;
    sock.set_read_timeout(Some(POLL))
        .map_err(|error| GatewayError::Socket {
            addr: cfg.listen,
            error,
        })?;
    let sock = Arc::new(sock);
    let stats = Arc::new(Stats::default());
    let quit = Arc::new(AtomicBool::new(false));
    let (tx_up, tx_updates) = mpsc::channel::<TxUpdate>();
    let (rx_up, rx_updates) = mpsc::channel::<RxUpdate>();
    let (to_mgr, from_threads) = amp::unbounded_channel::<ToManager>();
    tracing::info!(
        "gateway {} ({:?}): TUN {} {}/{} mtu {}, wan {} → peer {}, SM4 kernel {}",
        cfg.sae,
        cfg.role,
        cfg.tun_name,
        cfg.tun_address,
        cfg.tun_netmask,
        cfg.mtu,
        cfg.listen,
        cfg.peer,
        qkdnet_crypto::sm4::kernel().name()
    );

    let sender = {
        let (sock, stats, quit, peer, pad) = (
            sock.clone(),
            stats.clone(),
            quit.clone(),
            cfg.peer,
            cfg.pad_to,
        );
        std::thread::Builder::new()
            .name("gw-send".into())
            .spawn(move || send_loop(reader, &sock, peer, pad, &tx_updates, &stats, &quit))
            .map_err(GatewayError::Runtime)?
    };
    let receiver = {
        let (sock, stats, quit, peer) = (sock.clone(), stats.clone(), quit.clone(), cfg.peer);
        std::thread::Builder::new()
            .name("gw-recv".into())
            .spawn(move || recv_loop(writer, &sock, peer, &rx_updates, &to_mgr, &stats, &quit))
            .map_err(GatewayError::Runtime)?
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(GatewayError::Runtime)?;
    let mut installer = TunnelInstaller {
        role: cfg.role,
        tx_up,
        rx_up,
        stats: &stats,
        metrics: cfg.metrics_file.as_deref().map(|p| (p, cfg.sae.as_str())),
        last_metrics: Instant::now(),
        kernel_logged: false,
    };
    let keys = KeyManager {
        role: cfg.role,
        policy: cfg.policy.clone(),
        sae: cfg.sae.clone(),
        peer_sae: cfg.peer_sae.clone(),
    };
    let send = |bytes: &[u8]| {
        if let Err(e) = sock.send_to(bytes, cfg.peer) {
            tracing::debug!("control send: {e}");
        }
    };
    rt.block_on(async {
        tokio::select! {
            () = keys.run(client, send, from_threads, &mut installer) => {}
            () = stop => {}
        }
    });
    quit.store(true, Ordering::Relaxed);
    let _ = sender.join();
    let _ = receiver.join();
    if let Some(path) = &cfg.metrics_file {
        write_metrics(path, &stats.render(&cfg.sae));
    }
    Ok(stats)
}

fn send_loop(
    reader: tun::Reader,
    sock: &UdpSocket,
    peer: SocketAddr,
    pad_to: usize,
    updates: &mpsc::Receiver<TxUpdate>,
    stats: &Stats,
    quit: &AtomicBool,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(MAX_DATAGRAM + 64);
    let mut sa: Option<Outbound> = None;
    while !quit.load(Ordering::Relaxed) {
        let n = match reader.recv_timeout(&mut buf, POLL) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                // Idle: take SA changes anyway, so retired keys do not wait
                // in the channel.
                while let Ok(TxUpdate::Send(o)) = updates.try_recv() {
                    sa = Some(o);
                }
                continue;
            }
            Err(e) => {
                tracing::warn!("TUN read: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        while let Ok(TxUpdate::Send(o)) = updates.try_recv() {
            sa = Some(o);
        }
        let now = Instant::now();
        let sealed = sa
            .as_mut()
            .is_some_and(|o| o.seal(now, &buf[..n], pad_to, &mut out).is_ok());
        if !sealed {
            stats.dropped_no_key.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match sock.send_to(&out, peer) {
            Ok(_) => {
                stats.tx_packets.fetch_add(1, Ordering::Relaxed);
                stats.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!("wan send: {e}"),
        }
    }
}

struct InSa {
    sa: Inbound,
    reported: bool,
}

fn recv_loop(
    mut writer: tun::Writer,
    sock: &UdpSocket,
    peer: SocketAddr,
    updates: &mpsc::Receiver<RxUpdate>,
    to_mgr: &amp::UnboundedSender<ToManager>,
    stats: &Stats,
    quit: &AtomicBool,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sas: Vec<InSa> = Vec::new();
    while !quit.load(Ordering::Relaxed) {
        let received = sock.recv_from(&mut buf);
        let now = Instant::now();
        while let Ok(u) = updates.try_recv() {
            match u {
                RxUpdate::Install(sa) => {
                    sas.retain(|s| s.sa.spi() != sa.spi());
                    sas.push(InSa {
                        sa,
                        reported: false,
                    });
                }
                RxUpdate::Retire { spi, at } => {
                    for s in sas.iter_mut().filter(|s| s.sa.spi() == spi) {
                        s.sa.retire_at(at);
                    }
                }
            }
        }
        // An SA past its end stays a little (its packets count as expired, not
        // unknown), then goes.
        sas.retain(|s| now < s.sa.expires() + Duration::from_secs(10));
        let (n, from) = match received {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::debug!("wan receive: {e}");
                continue;
            }
        };
        if from != peer {
            stats.rx_wrong_source.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let datagram = &mut buf[..n];
        match wire::parse(datagram) {
            Err(_) => {
                stats.rx_malformed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Datagram::Control(c)) => {
                let _ = to_mgr.send(ToManager::Control(c));
            }
            Ok(Datagram::Data { spi, seq }) => {
                let Some(s) = sas.iter_mut().find(|s| s.sa.spi() == spi) else {
                    stats.rx_unknown_spi.fetch_add(1, Ordering::Relaxed);
                    let _ = to_mgr.send(ToManager::UnknownSpi(spi));
                    continue;
                };
                match s.sa.open(now, seq, datagram) {
                    Ok(packet) => {
                        let len = packet.len();
                        if let Err(e) = writer.write(packet) {
                            tracing::debug!("TUN write: {e}");
                            continue;
                        }
                        stats.rx_packets.fetch_add(1, Ordering::Relaxed);
                        stats.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                        if !s.reported {
                            s.reported = true;
                            let _ = to_mgr.send(ToManager::Authentic(spi));
                        }
                    }
                    Err(OpenError::Replayed) => {
                        stats.rx_replayed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(OpenError::Forged) => {
                        stats.rx_forged.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(OpenError::Expired) => {
                        stats.rx_expired.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(OpenError::NotIp) => {
                        stats.rx_malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The tunnel's side of the key manager: SAs go to the packet threads.
struct TunnelInstaller<'a> {
    role: crate::sa::Role,
    tx_up: mpsc::Sender<TxUpdate>,
    rx_up: mpsc::Sender<RxUpdate>,
    stats: &'a Stats,
    metrics: Option<(&'a std::path::Path, &'a str)>,
    last_metrics: Instant,
    kernel_logged: bool,
}

impl Installer for TunnelInstaller<'_> {
    fn install(&mut self, keys: &Arc<EpochKeys>, switch: bool, expires: Instant) {
        if !self.kernel_logged {
            self.kernel_logged = true;
            tracing::info!("SM4-GCM on kernel {}", keys.kernel().name());
        }
        let _ = self
            .rx_up
            .send(RxUpdate::Install(Inbound::new(keys, self.role, expires)));
        if switch {
            self.switch(keys, expires);
        }
    }

    fn switch(&mut self, keys: &Arc<EpochKeys>, expires: Instant) {
        let _ = self
            .tx_up
            .send(TxUpdate::Send(Outbound::new(keys, self.role, expires)));
    }

    fn retire(&mut self, spi: u32, at: Instant) {
        let _ = self.rx_up.send(RxUpdate::Retire { spi, at });
    }

    fn event(&mut self, e: &Event) {
        match e {
            Event::Rekeyed { .. } => {
                self.stats.rekeys.fetch_add(1, Ordering::Relaxed);
                self.stats.up.store(1, Ordering::Relaxed);
            }
            Event::FetchFailed { .. } => {
                self.stats.key_failures.fetch_add(1, Ordering::Relaxed);
            }
            Event::Expired { .. } => self.stats.up.store(0, Ordering::Relaxed),
            _ => {}
        }
    }

    fn traffic(&self) -> u64 {
        self.stats.tx_bytes.load(Ordering::Relaxed) + self.stats.rx_bytes.load(Ordering::Relaxed)
    }

    fn tick(&mut self, now: Instant, up: bool) {
        self.stats.up.store(u64::from(up), Ordering::Relaxed);
        if let Some((path, name)) = self.metrics {
            if now.duration_since(self.last_metrics) >= Duration::from_secs(1) {
                self.last_metrics = now;
                write_metrics(path, &self.stats.render(name));
            }
        }
    }
}

fn write_metrics(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("prom.tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}
