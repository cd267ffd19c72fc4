//! The WireGuard agent: keeps a WireGuard peer's preshared key fed with QKD keys.
//!
//! WireGuard mixes an optional 32-byte preshared key into every handshake; a
//! fresh one from the QKD network makes the tunnel's keys depend on quantum key
//! as well as on X25519. Two agents (one beside each WireGuard end) agree on keys
//! exactly as two gateways do ([`crate::keymgr`], offer and ack over UDP on
//! their own port), and each epoch's preshared key (derived from its QKD key,
//! [`crate::sa::EpochKeys::wireguard_psk`]) is written into the WireGuard
//! interface through its UAPI socket (`/var/run/wireguard/IFACE.sock`, as
//! `wireguard-go` serves it).
//!
//! **Before the first handshake.** The agent configures the peer itself — public
//! key, endpoint, allowed IPs *and* preshared key in one UAPI transaction — so
//! the peer does not exist in the interface until it has a QKD preshared key,
//! and no handshake can complete without one. Operators configure the
//! interface's private key and listen port, not the peer.
//!
//! **Rotation.** Each new epoch replaces the preshared key; WireGuard uses it from
//! its next handshake (every two minutes while traffic flows), and sessions in
//! progress continue. The two ends install within a round trip of each other;
//! a handshake that falls in that gap fails and WireGuard retries it.
//!
//! **Fail closed.** When the key's lifetime ends with no successor the agent
//! removes the peer: WireGuard then drops the peer's traffic. The next key adds
//! it back. A peer found at start (left by an earlier run) is removed until
//! the first key arrives, and stopping the agent removes the peer too. UAPI
//! failures are retried every tick. Not done: the kernel module's netlink interface (`wg`'s other
//! back end); this agent speaks UAPI only.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc as amp;
use zeroize::Zeroizing;

use crate::config::WgAgentConfig;
use crate::keyctl::Event;
use crate::keymgr::{Installer, KeyManager, ToManager};
use crate::run::GatewayError;
use crate::sa::EpochKeys;
use crate::wire::{self, Datagram};

/// Directory of wireguard-go's UAPI sockets.
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// One UAPI `set` transaction; `body` is the lines after `set=1`.
fn uapi_set(interface: &str, body: &str) -> std::io::Result<()> {
    let path = format!("{UAPI_DIR}/{interface}.sock");
    let mut s = UnixStream::connect(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let msg = Zeroizing::new(format!("set=1\n{body}\n"));
    s.write_all(msg.as_bytes())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    while !answer.ends_with(b"\n\n") && answer.len() < 4096 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    match text.lines().find_map(|l| l.strip_prefix("errno=")) {
        Some("0") => Ok(()),
        Some(n) => Err(std::io::Error::other(format!(
            "WireGuard refused the configuration (errno {n})"
        ))),
        None => Err(std::io::Error::other(format!(
            "WireGuard gave no answer on {path}"
        ))),
    }
}

struct WgInstaller<'a> {
    cfg: &'a WgAgentConfig,
    /// The peer exists in the interface (as far as the agent knows).
    peer_present: bool,
    /// The epoch whose preshared key should be in place, and whether it is.
    want: Option<Arc<EpochKeys>>,
    installed: Option<u32>,
    /// The peer must go (fail closed); retried every tick until it has.
    want_removed: bool,
    rotations: u64,
}

impl WgInstaller<'_> {
    fn set_psk(&mut self, keys: &EpochKeys) -> bool {
        let mut body = Zeroizing::new(String::with_capacity(512));
        body.push_str("public_key=");
        body.push_str(&hex::encode(self.cfg.peer_public_key));
        body.push_str("\npreshared_key=");
        let psk_hex = Zeroizing::new(hex::encode(keys.wireguard_psk()));
        body.push_str(&psk_hex);
        body.push('\n');
        if !self.peer_present {
            body.push_str(&format!(
                "endpoint={}\nreplace_allowed_ips=true\n",
                self.cfg.endpoint
            ));
            for ip in &self.cfg.allowed_ips {
                body.push_str(&format!("allowed_ip={ip}\n"));
            }
        }
        match uapi_set(&self.cfg.interface, &body) {
            Ok(()) => {
                self.rotations += 1;
                if !self.peer_present {
                    tracing::info!(
                        "WireGuard peer configured on {} with a QKD preshared key (SPI {:#010x})",
                        self.cfg.interface,
                        keys.spi
                    );
                }
                self.peer_present = true;
                self.installed = Some(keys.spi);
                true
            }
            Err(e) => {
                tracing::error!(
                    "setting the preshared key on {}: {e} (retrying)",
                    self.cfg.interface
                );
                false
            }
        }
    }

    fn remove_peer(&mut self) -> bool {
        let body = format!(
            "public_key={}\nremove=true\n",
            hex::encode(self.cfg.peer_public_key)
        );
        match uapi_set(&self.cfg.interface, &body) {
            Ok(()) => {
                if self.peer_present {
                    tracing::error!(
                        "WireGuard peer removed from {} (fail closed) until a new key arrives",
                        self.cfg.interface
                    );
                }
                self.peer_present = false;
                self.installed = None;
                self.want_removed = false;
                true
            }
            Err(e) => {
                tracing::error!("removing the WireGuard peer: {e} (retrying)");
                false
            }
        }
    }

    fn want(&mut self, keys: &Arc<EpochKeys>) {
        self.want = Some(keys.clone());
        self.want_removed = false;
        self.set_psk(keys);
    }
}

impl Installer for WgInstaller<'_> {
    fn install(&mut self, keys: &Arc<EpochKeys>, switch: bool, _expires: Instant) {
        if switch {
            self.want(keys);
        }
    }

    fn switch(&mut self, keys: &Arc<EpochKeys>, _expires: Instant) {
        self.want(keys);
    }

    fn retire(&mut self, _spi: u32, _at: Instant) {}

    fn event(&mut self, e: &Event) {
        if matches!(e, Event::Expired { .. }) {
            self.want = None;
            self.want_removed = true;
            self.remove_peer();
        }
    }

    fn traffic(&self) -> u64 {
        // Rekeying by time only: WireGuard's own handshakes bound a key's use.
        0
    }

    fn tick(&mut self, _now: Instant, _up: bool) {
        if self.want_removed {
            self.remove_peer();
        } else if let Some(k) = self.want.clone() {
            if self.installed != Some(k.spi) {
                self.set_psk(&k);
            }
        }
    }
}

/// Runs the agent until `stop` resolves.
pub fn run(
    cfg: WgAgentConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), GatewayError> {
    let client = qkdnet_etsi::connect::ConnectFile::load(&cfg.connect)
        .and_then(|f| f.client(&cfg.sae, Duration::from_secs(5)))
        .map_err(|e| {
            GatewayError::Kme(format!("SAE {} of {}: {e}", cfg.sae, cfg.connect.display()))
        })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(GatewayError::Runtime)?;
    rt.block_on(async {
        let sock = tokio::net::UdpSocket::bind(cfg.listen)
            .await
            .map_err(|error| GatewayError::Socket {
                addr: cfg.listen,
                error,
            })?;
        tracing::info!(
            "WireGuard agent {} ({:?}) for {}: control {} → {}",
            cfg.sae,
            cfg.role,
            cfg.interface,
            cfg.listen,
            cfg.peer
        );
        let sock = Arc::new(sock);
        let (to_mgr, inputs) = amp::unbounded_channel();
        let reader = {
            let (sock, peer) = (sock.clone(), cfg.peer);
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                    if from != peer {
                        continue;
                    }
                    if let Ok(Datagram::Control(c)) = wire::parse(&buf[..n]) {
                        let _ = to_mgr.send(ToManager::Control(c));
                    }
                }
            })
        };
        let send = |bytes: &[u8]| {
            if let Err(e) = sock.try_send_to(bytes, cfg.peer) {
                tracing::debug!("control send: {e}");
            }
        };
        let mut installer = WgInstaller {
            cfg: &cfg,
            peer_present: false,
            want: None,
            installed: None,
            want_removed: false,
            rotations: 0,
        };
        // A peer left by an earlier run has a preshared key nobody vouches for
        // any more: it goes until the first key of this run arrives.
        installer.want_removed = !installer.remove_peer();
        let keys = KeyManager {
            role: cfg.role,
            policy: cfg.policy.clone(),
            sae: cfg.sae.clone(),
            peer_sae: cfg.peer_sae.clone(),
        };
        tokio::select! {
            () = keys.run(client, send, inputs, &mut installer) => {}
            () = stop => {}
        }
        reader.abort();
        tracing::info!(
            "WireGuard agent stopped after {} key installations",
            installer.rotations
        );
        Ok::<(), GatewayError>(())
    })?;
    Ok(())
}
