//! The gateway's configuration file (TOML).
//!
//! ```toml
//! role = "initiator"            # this end takes keys (master SAE); the other is "responder"
//! listen = "192.0.2.1:4789"     # UDP on the wan
//! peer = "192.0.2.2:4789"       # the other gateway (packets from elsewhere are dropped)
//! pad_to = 0                    # pad packets to a multiple of this many bytes (0: off)
//! metrics_file = "gw-a.prom"    # Prometheus text, rewritten every second (optional)
//!
//! [tun]
//! name = "qkd0"
//! address = "10.99.0.1"
//! netmask = "255.255.255.252"
//! mtu = 1400
//!
//! [kme]
//! connect = "state/connect.json" # relative paths: from this file's directory
//! sae = "sae-gw-a"
//! peer_sae = "sae-gw-b"
//!
//! [rekey]
//! seconds = 60                  # a new key this often…
//! bytes = 1073741824            # …or after this much traffic, whichever first
//! lifetime_seconds = 180        # hard limit: past it with no new key, traffic is dropped
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::keyctl::Policy;
use crate::sa::Role;

/// A parsed, checked configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This end's role.
    pub role: Role,
    /// UDP address on the wan.
    pub listen: SocketAddr,
    /// The other gateway.
    pub peer: SocketAddr,
    /// Padding granularity (0: none).
    pub pad_to: usize,
    /// Where to write metrics.
    pub metrics_file: Option<PathBuf>,
    /// TUN device name.
    pub tun_name: String,
    /// TUN address.
    pub tun_address: Ipv4Addr,
    /// TUN netmask.
    pub tun_netmask: Ipv4Addr,
    /// TUN MTU.
    pub mtu: u16,
    /// connect.json of the QKD network.
    pub connect: PathBuf,
    /// This gateway's SAE ID.
    pub sae: String,
    /// The other gateway's SAE ID.
    pub peer_sae: String,
    /// Rekeying.
    pub policy: Policy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    role: String,
    listen: SocketAddr,
    peer: SocketAddr,
    #[serde(default)]
    pad_to: usize,
    metrics_file: Option<PathBuf>,
    tun: Tun,
    kme: Kme,
    #[serde(default)]
    rekey: Rekey,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tun {
    #[serde(default = "default_tun")]
    name: String,
    address: Ipv4Addr,
    #[serde(default = "default_netmask")]
    netmask: Ipv4Addr,
    #[serde(default = "default_mtu")]
    mtu: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Kme {
    connect: PathBuf,
    sae: String,
    peer_sae: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rekey {
    #[serde(default = "default_rekey_seconds")]
    seconds: f64,
    #[serde(default = "default_rekey_bytes")]
    bytes: u64,
    #[serde(default = "default_lifetime")]
    lifetime_seconds: f64,
}

impl Default for Rekey {
    fn default() -> Self {
        Self {
            seconds: default_rekey_seconds(),
            bytes: default_rekey_bytes(),
            lifetime_seconds: default_lifetime(),
        }
    }
}

fn default_tun() -> String {
    "qkd0".into()
}
fn default_netmask() -> Ipv4Addr {
    Ipv4Addr::new(255, 255, 255, 252)
}
fn default_mtu() -> u16 {
    1400
}
fn default_rekey_seconds() -> f64 {
    60.0
}
fn default_rekey_bytes() -> u64 {
    1 << 30
}
fn default_lifetime() -> f64 {
    180.0
}

/// A configuration that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl GatewayConfig {
    /// Reads and checks a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        read(path, Self::parse)
    }

    /// Parses configuration text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let f: File = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        let (role, policy) = common(&f.role, &f.rekey, &f.kme)?;
        if !(576..=9000).contains(&f.tun.mtu) {
            return Err(ConfigError("tun.mtu must be between 576 and 9000".into()));
        }
        if f.pad_to > 1500 {
            return Err(ConfigError("pad_to must be at most 1500".into()));
        }
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(Self {
            role,
            listen: f.listen,
            peer: f.peer,
            pad_to: f.pad_to,
            metrics_file: f.metrics_file.map(abs),
            tun_name: f.tun.name,
            tun_address: f.tun.address,
            tun_netmask: f.tun.netmask,
            mtu: f.tun.mtu,
            connect: abs(f.kme.connect),
            sae: f.kme.sae,
            peer_sae: f.kme.peer_sae,
            policy,
        })
    }

    /// The initiator's and the responder's SAE IDs.
    pub fn sae_pair(&self) -> (&str, &str) {
        match self.role {
            Role::Initiator => (&self.sae, &self.peer_sae),
            Role::Responder => (&self.peer_sae, &self.sae),
        }
    }
}

/// Reads `path` and parses it with relative paths taken from its directory;
/// errors name the file.
fn read<T>(
    path: &Path,
    parse: fn(&str, &Path) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
}

/// What gateways and agents share: role, rekeying, SAEs.
fn common(r: &str, rekey: &Rekey, kme: &Kme) -> Result<(Role, Policy), ConfigError> {
    let role = role(r)?;
    let policy = policy(rekey)?;
    check_kme(kme)?;
    Ok((role, policy))
}

fn role(s: &str) -> Result<Role, ConfigError> {
    match s {
        "initiator" => Ok(Role::Initiator),
        "responder" => Ok(Role::Responder),
        other => Err(ConfigError(format!(
            "role must be \"initiator\" or \"responder\", not {other:?}"
        ))),
    }
}

fn check_kme(k: &Kme) -> Result<(), ConfigError> {
    if k.sae == k.peer_sae {
        return Err(ConfigError("kme.sae and kme.peer_sae must differ".into()));
    }
    Ok(())
}

fn policy(r: &Rekey) -> Result<Policy, ConfigError> {
    let secs = |what: &str, v: f64| {
        if v.is_finite() && v > 0.0 && v < 1e9 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(ConfigError(format!(
                "{what} must be a positive number of seconds"
            )))
        }
    };
    let rekey_after = secs("rekey.seconds", r.seconds)?;
    let lifetime = secs("rekey.lifetime_seconds", r.lifetime_seconds)?;
    if lifetime <= rekey_after {
        return Err(ConfigError(
            "rekey.lifetime_seconds must exceed rekey.seconds (room to get the next key)".into(),
        ));
    }
    if r.bytes == 0 {
        return Err(ConfigError("rekey.bytes must be positive".into()));
    }
    let offer_timeout = Policy::default()
        .offer_timeout
        .min((lifetime - rekey_after) / 2);
    Ok(Policy {
        rekey_after,
        rekey_bytes: r.bytes,
        lifetime,
        // An offer the responder does not take is given up early enough to
        // try another key before the current one expires.
        offer_timeout,
        // The old epoch stays as long as the initiator may still send under it
        // (acks lost: it switches at the ack, the first packet under the new
        // epoch, or when it gives the offer up) plus two retransmissions.
        grace: offer_timeout + 2 * Policy::default().retransmit,
        ..Policy::default()
    })
}

/// The WireGuard agent's configuration file (TOML): the same `role`, control
/// channel (`listen`, `peer`), `[kme]` and `[rekey]` as a gateway's, and the
/// WireGuard peer whose preshared key it keeps:
///
/// ```toml
/// role = "initiator"
/// listen = "192.0.2.1:7772"        # the agents' control channel (UDP)
/// peer = "192.0.2.2:7772"
/// [wireguard]
/// interface = "wg0"                # wireguard-go's UAPI socket /var/run/wireguard/wg0.sock
/// peer_public_key = "base64…"      # the other end's WireGuard public key
/// endpoint = "192.0.2.2:51820"     # where that peer listens
/// allowed_ips = ["10.2.0.0/24"]
/// [kme]
/// connect = "state/connect.json"
/// sae = "sae-gw-a"
/// peer_sae = "sae-gw-b"
/// [rekey]
/// seconds = 120
/// lifetime_seconds = 600
/// ```
#[derive(Debug, Clone)]
pub struct WgAgentConfig {
    /// This end's role.
    pub role: Role,
    /// Control channel address.
    pub listen: SocketAddr,
    /// The other agent.
    pub peer: SocketAddr,
    /// WireGuard interface name.
    pub interface: String,
    /// The WireGuard peer's public key (32 bytes).
    pub peer_public_key: [u8; 32],
    /// Its endpoint.
    pub endpoint: SocketAddr,
    /// Its allowed IPs.
    pub allowed_ips: Vec<String>,
    /// connect.json of the QKD network.
    pub connect: PathBuf,
    /// This agent's SAE ID.
    pub sae: String,
    /// The other agent's SAE ID.
    pub peer_sae: String,
    /// Rekeying.
    pub policy: Policy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WgFile {
    role: String,
    listen: SocketAddr,
    peer: SocketAddr,
    wireguard: Wg,
    kme: Kme,
    #[serde(default)]
    rekey: Rekey,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wg {
    interface: String,
    peer_public_key: String,
    endpoint: SocketAddr,
    allowed_ips: Vec<String>,
}

impl WgAgentConfig {
    /// Reads and checks a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        read(path, Self::parse)
    }

    /// Parses configuration text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        use base64::Engine as _;
        let f: WgFile = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        let (role, policy) = common(&f.role, &f.rekey, &f.kme)?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(f.wireguard.peer_public_key.trim())
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| {
                ConfigError(
                    "wireguard.peer_public_key must be a base64 WireGuard key (32 bytes)".into(),
                )
            })?;
        let iface = &f.wireguard.interface;
        if iface.is_empty()
            || iface.len() > 15
            || !iface
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(ConfigError(format!(
                "wireguard.interface {iface:?} is not an interface name"
            )));
        }
        for ip in &f.wireguard.allowed_ips {
            let (addr, len) = ip.split_once('/').unwrap_or((ip, ""));
            let digits = !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit());
            let ok = match addr.parse::<std::net::IpAddr>() {
                Ok(a) => {
                    digits
                        && len
                            .parse::<u8>()
                            .is_ok_and(|l| l <= if a.is_ipv4() { 32 } else { 128 })
                }
                Err(_) => false,
            };
            if !ok {
                return Err(ConfigError(format!(
                    "wireguard.allowed_ips: {ip:?} is not ADDRESS/PREFIX"
                )));
            }
        }
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(Self {
            role,
            listen: f.listen,
            peer: f.peer,
            interface: f.wireguard.interface,
            peer_public_key: key,
            endpoint: f.wireguard.endpoint,
            allowed_ips: f.wireguard.allowed_ips,
            connect: abs(f.kme.connect),
            sae: f.kme.sae,
            peer_sae: f.kme.peer_sae,
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
role = "initiator"
listen = "127.0.0.1:4789"
peer = "127.0.0.1:4790"
[tun]
address = "10.99.0.1"
[kme]
connect = "state/connect.json"
sae = "alice"
peer_sae = "bob"
[rekey]
seconds = 0.5
lifetime_seconds = 5
"#;

    #[test]
    fn parses_with_defaults_and_relative_paths() {
        let c = GatewayConfig::parse(OK, Path::new("/etc/qkd")).expect("valid");
        assert_eq!(c.role, Role::Initiator);
        assert_eq!(c.connect, Path::new("/etc/qkd/state/connect.json"));
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.policy.rekey_after, Duration::from_millis(500));
        assert_eq!(c.policy.offer_timeout, Duration::from_millis(2250));
        assert_eq!(c.policy.grace, Duration::from_millis(2750));
        assert_eq!(c.sae_pair(), ("alice", "bob"));
    }

    const WG: &str = r#"
role = "responder"
listen = "127.0.0.1:7772"
peer = "127.0.0.1:7773"
[wireguard]
interface = "wg0"
peer_public_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
endpoint = "127.0.0.1:51820"
allowed_ips = ["10.2.0.0/24", "fd00::/64"]
[kme]
connect = "/s/connect.json"
sae = "bob"
peer_sae = "alice"
"#;

    #[test]
    fn wireguard_agent_config_parses_and_refuses_bad_keys_and_names() {
        let c = WgAgentConfig::parse(WG, Path::new(".")).expect("valid");
        assert_eq!(c.role, Role::Responder);
        assert_eq!(c.allowed_ips.len(), 2);
        assert_eq!(c.policy.rekey_after, Duration::from_secs(60));
        for (bad, want) in [
            (
                WG.replace("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=", "short"),
                "base64 WireGuard key",
            ),
            (WG.replace("\"wg0\"", "\"../etc\""), "not an interface name"),
            (WG.replace("10.2.0.0/24", "10.2.0.0/33"), "ADDRESS/PREFIX"),
        ] {
            let e = WgAgentConfig::parse(&bad, Path::new(".")).expect_err(&bad);
            assert!(e.to_string().contains(want), "{e} should say {want}");
        }
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        for (bad, want) in [
            (OK.replace("initiator", "boss"), "role must be"),
            (
                OK.replace("lifetime_seconds = 5", "lifetime_seconds = 0.2"),
                "must exceed",
            ),
            (
                OK.replace("peer_sae = \"bob\"", "peer_sae = \"alice\""),
                "must differ",
            ),
            (OK.replace("[tun]", "[tun]\nmtu = 100"), "tun.mtu"),
            (OK.replace("[tun]", "[tun]\ncolour = 1"), "unknown field"),
            (OK.replace("seconds = 0.5", "seconds = -1"), "positive"),
        ] {
            let e = GatewayConfig::parse(&bad, Path::new(".")).expect_err(&bad);
            assert!(e.to_string().contains(want), "{e} should say {want}");
        }
    }
}
